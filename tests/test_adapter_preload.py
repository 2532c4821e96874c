"""Adapter loads keep their host work off the engine's worker, and a start-up preloads several adapters at once.

A load's host copy (checked, scaled, cast, then pinned tensor by tensor: 0.4-1.9 s per 8B adapter on an H100,
2026-12-08) ran on the worker, between two steps of every running stream; only `keep` (pinning, the slots' layout)
belongs there. Preloads used to run one after the other, then the warm-up: 9.3 s for 8 adapters on that machine.
"""

from __future__ import annotations

import asyncio
import threading

from tests.test_engine import EN, ZH


def test_a_load_copies_off_the_worker_and_keeps_on_it(tiny_model_dir, trained_adapters, monkeypatch):
    """In the server's own process: the host copy runs in the load's reading thread, `keep` on the worker."""
    from server.engine.lora_slots import LoraSlots
    from tests.test_engine import served_state

    threads: dict[str, list[str]] = {"host_copy": [], "keep": []}
    for name in threads:
        original = getattr(LoraSlots, name)

        def recorded(self, *args, _name=name, _original=original, **kwargs):
            threads[_name].append(threading.current_thread().name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(LoraSlots, name, recorded)
    state = served_state(tiny_model_dir, trained_adapters)
    assert len(state.runner.attached) == 2
    assert threads["keep"] == ["loraserve-engine"] * 2, threads
    assert len(threads["host_copy"]) == 2 and "loraserve-engine" not in threads["host_copy"], threads


def test_the_engine_process_copies_in_its_reading_thread(tiny_model_dir, trained_adapters):
    """The engine process's attach job: files read and copied where the job is built (a reading thread); the
    callable the worker runs only keeps it."""
    from contract.fingerprint import base_fingerprint
    from server.adapters.checks import base_shapes, check_adapter_dir, lora_config
    from server.engine.lora_slots import HostAdapter
    from server.engine.runner import load_runner
    from server.engine_process import child

    runner = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False)
    base = base_shapes(runner.model, base_fingerprint(runner.model.config, runner.tokenizer))
    checked = check_adapter_dir(trained_adapters.en, trained_adapters.root, base, max_rank=64, max_bytes=1 << 30)
    kept = []
    real_keep = runner.keep
    runner.keep = lambda key, adapter: (kept.append(adapter), real_keep(key, adapter))
    job = child._job(
        None, runner, "attach", ("k", lora_config(checked), child.AdapterFiles(str(checked.path), checked.sha256))
    )
    assert runner.attached == set() and kept == []  # nothing kept until the worker runs the job
    job()
    assert runner.attached == {"k"}
    assert isinstance(kept[0], HostAdapter) and kept[0].rank == int(lora_config(checked).r)


def test_preloads_run_at_once_and_the_first_failure_stops_the_start(tiny_model_dir, trained_adapters):
    """Two preloads are in flight together (each waits, bounded, for the other to start: one after the other,
    the first would time out); a failing one ends preload_adapters with its own message, and no warm-up runs."""
    import pytest

    from server.errors import ServeError

    state = loaded_state(tiny_model_dir, trained_adapters.root, {EN: EN, ZH: ZH})
    entered, both = [], asyncio.Event()
    load = state.registry.load

    async def load_when_both_started(name: str, path: str):
        entered.append(name)
        if len(entered) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), timeout=30)
        return await load(name, path)

    state.registry.load = load_when_both_started
    state.engine.start()
    try:
        asyncio.run(state.preload_adapters())
    finally:
        state.engine.stop()
    assert sorted(entered) == sorted([EN, ZH]) and state.registry.names() == sorted([EN, ZH])

    (trained_adapters.root.parent / "not-an-adapter").mkdir(exist_ok=True)
    state = loaded_state(tiny_model_dir, trained_adapters.root, {EN: EN, "broken": "../not-an-adapter"})
    warmed = []
    state._warm_up = lambda: warmed.append(1)
    state.engine.start()
    try:
        with pytest.raises(ServeError, match="preloading adapter 'broken' from '../not-an-adapter'"):
            asyncio.run(state.preload_adapters())
    finally:
        state.engine.stop()
    assert warmed == []


def test_more_preloads_than_max_adapters_is_a_setting_error(tiny_model_dir, tmp_path):
    """Preloads run at once: over the limit, which one failed would depend on timing, so it is refused up front."""
    from tests.test_preflight import assert_one_line, run_cli

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    proc = run_cli(
        "serve",
        "--base-model",
        str(tiny_model_dir),
        "--adapter-root",
        str(tmp_path),
        "--adapter",
        "a=a",
        "--adapter",
        "b=b",
        env={"LORASERVE_MAX_ADAPTERS": "1"},
    )
    assert_one_line(proc, "2 adapters to preload (LORASERVE_ADAPTERS, --adapter), more than max_adapters (1,")


def test_the_registry_reads_four_adapters_at_once(tiny_model_dir, trained_adapters, tmp_path):
    """Six preloads at once: their reads (checks, files, host copies) run READS_AT_ONCE at a time, each holding its
    files' bytes and copies of its tensors; all six load."""
    import shutil
    import time

    from server.adapters.registry import READS_AT_ONCE

    root = tmp_path / "root"
    for index in range(6):
        shutil.copytree(trained_adapters.en, root / f"a{index}")
    state = loaded_state(tiny_model_dir, root, {f"a{index}": f"a{index}" for index in range(6)})
    reading, most = [0], [0]
    lock = threading.Lock()
    read = state.registry._check_and_read

    def counted(path):
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        time.sleep(0.3)  # long enough for every load let in to be reading together
        try:
            return read(path)
        finally:
            with lock:
                reading[0] -= 1

    state.registry._check_and_read = counted
    state.engine.start()
    try:
        asyncio.run(state.preload_adapters())
    finally:
        state.engine.stop()
    assert most[0] == READS_AT_ONCE == 4 and len(state.registry.names()) == 6


def test_a_cluster_catalog_may_hold_more_adapters_than_one_server_preloads():
    """max_adapters bounds one server's preloads (serve refuses more up front), not a cluster's catalog."""
    import pytest

    from server.errors import Conflict
    from server.settings import ServerSettings
    from server.state import ServerState

    catalog = ServerSettings(base_model="m", max_adapters=4, adapters={f"a{i}": f"a{i}" for i in range(20)})
    assert "20 adapters to preload" in catalog.preload_problem()
    with pytest.raises(Conflict, match="more than max_adapters"):
        asyncio.run(ServerState(settings=catalog).preload_adapters())
    assert ServerSettings(base_model="m", adapters={"a": "a"}).preload_problem() is None


def loaded_state(model_dir, root, adapters: dict[str, str]):
    """The server's composition root on the tiny model, loaded, its `adapters` not yet preloaded."""
    from server.settings import ServerSettings
    from server.state import ServerState

    state = ServerState(
        settings=ServerSettings(
            base_model=str(model_dir), backend="transformers", adapter_root=str(root), adapters=adapters
        )
    )
    state.load_model()
    return state
