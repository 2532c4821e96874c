"""GPU-only: the engine's CUDA-graph decode path against its eager path (bench/gpu/README.md says how
these are run there). Same model, same adapters, same mixed batch: the tokens must be the same, and
the graphs must really have been used (not silently turned off)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.test_engine import EN, ZH, drain, request, rows_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def served_state(tiny_model_dir, trained_adapters, *, cuda_graphs: bool):
    from server.settings import ServerSettings
    from server.state import ServerState

    settings = ServerSettings(
        base_model=str(tiny_model_dir),
        backend="transformers",
        cuda_graphs=cuda_graphs,
        adapter_root=trained_adapters.root,
        adapters={EN: EN, ZH: ZH},
    )
    state = ServerState(settings=settings)
    state.load_model()
    state.engine.start()
    asyncio.run(state.preload_adapters())
    return state


def test_cuda_graph_decode_equals_eager_decode(tiny_model_dir, trained_adapters):
    results = {}
    for graphs in (False, True):
        state = served_state(tiny_model_dir, trained_adapters, cuda_graphs=graphs)
        en, zh = rows_of(EN), rows_of(ZH)
        reqs = (
            [request(state, adapter=EN, row=en[i]) for i in range(6)]
            + [request(state, adapter=ZH, row=zh[i]) for i in range(6)]
            + [request(state, inputs="hello hello hello hello", max_new_tokens=40) for _ in range(3)]
        )

        async def run_all(state=state, reqs=reqs):
            return await asyncio.gather(*(drain(state.engine.generate(*r)) for r in reqs))

        try:
            results[graphs] = [[t.id for t in tokens] for tokens, _ in asyncio.run(run_all())]
            if graphs:
                assert state.runner.graphs is not None and state.runner.graphs.enabled
                assert state.runner.graphs._graphs, "no decode graph was captured"
                served = [entry for entry in state.runner.graphs._graphs.values() if entry.replays]
                assert served, "no decode graph was replayed"
                assert all(entry.checked for entry in served)  # (warm-up captures sizes this batch never used)
        finally:
            state.engine.stop()
    assert results[True] == results[False]
    for i in range(6):
        assert state.runner.tokenizer.decode(results[True][i]).startswith(rows_of(EN)[i]["output"][:10])
