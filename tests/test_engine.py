"""The engine in-process, on the tiny model and the two trained fixture adapters (tier b of DESIGN.md).

What the HTTP tests cannot pin down: exactly which requests share a batch. An engine whose worker has
not started yet only queues what it is given, so everything submitted before `start()` is admitted in
the same step, and every running sequence, whatever its adapter, shares each forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from server.engine.engine import Engine
from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.errors import Overloaded, Unavailable

pytestmark = pytest.mark.slow

DEMO_DATA = Path(__file__).resolve().parents[1] / "loraserve" / "demo_data"
EN, ZH = "facts-en", "facts-zh"
ENDLESS = "hello hello hello hello"  # the base model does not emit EOS on it within 1,000 greedy tokens


def rows_of(adapter: str) -> list[dict]:
    path = DEMO_DATA / ("facts_en.jsonl" if adapter == EN else "facts_zh.jsonl")
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def served_state(tiny_model_dir, trained_adapters, *, adapters: dict[str, str] | None = None, **settings):
    """The server's own composition root on the tiny model with `adapters` (default EN and ZH) loaded."""
    from server.settings import ServerSettings
    from server.state import ServerState

    state = ServerState(
        settings=ServerSettings(
            base_model=str(tiny_model_dir),
            backend="transformers",
            adapter_root=trained_adapters.root,
            adapters=adapters or {EN: EN, ZH: ZH},
            **settings,
        )
    )
    state.load_model()
    state.engine.start()  # registry loads attach on the worker thread
    try:
        asyncio.run(state.preload_adapters())
    finally:
        state.engine.stop()
    return state


@pytest.fixture(scope="module")
def state(tiny_model_dir, trained_adapters):
    """Both adapters loaded; each test builds its engines on its runner."""
    return served_state(tiny_model_dir, trained_adapters)


def make_engine(state, **limits) -> Engine:
    limits = {"max_running": 32, "max_queue": 64, **limits}
    return Engine(state.runner, **limits)


def request(
    state,
    *,
    adapter: str | None = None,
    row: dict | None = None,
    inputs: str | None = None,
    max_new_tokens: int = 64,
    **params,
) -> tuple[list[int], SamplingParams, str | None]:
    """Prompt ids, parameters and adapter key, prepared the way the service does it."""
    version = state.registry.get(adapter) if adapter else None
    if inputs is None:
        template = version.template if version else state.service.base_template
        inputs = template.prompt(row["instruction"], row["input"])
    ids = state.runner.tokenizer(inputs, add_special_tokens=True).input_ids
    eos = state.runner.tokenizer.eos_token_id
    sampling = SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(eos,), **params)
    return ids, sampling, version.key if version else None


async def drain(events) -> tuple[list[TokenEvent], FinalEvent | ErrorEvent]:
    tokens = []
    async for event in events:
        if isinstance(event, TokenEvent):
            tokens.append(event)
        else:
            return tokens, event
    raise AssertionError("the stream ended without a final or error event")


async def run_together(engine: Engine, requests: list[tuple]) -> list[tuple]:
    """Submit everything before the worker starts: all of it is admitted in one step."""
    streams = [engine.generate(*r) for r in requests]
    engine.start()
    try:
        return await asyncio.gather(*(drain(s) for s in streams))
    finally:
        engine.stop()


async def run_alone(engine: Engine, requests: list[tuple]) -> list[tuple]:
    engine.start()
    try:
        return [await drain(engine.generate(*r)) for r in requests]
    finally:
        engine.stop()


async def run_staggered(engine: Engine, requests: list[tuple]) -> list[tuple]:
    """Each request submitted once the one before it has its first token: every one arrives mid-generation."""

    async def rest(first: TokenEvent, stream):
        tokens, final = await drain(stream)
        return [first, *tokens], final

    engine.start()
    try:
        tasks = []
        for req in requests:
            stream = engine.generate(*req)
            first = await anext(stream)  # running now: the next request arrives mid-generation
            tasks.append(asyncio.ensure_future(rest(first, stream)))
        await asyncio.gather(*tasks)
        return [t.result() for t in tasks]
    finally:
        engine.stop()


def ids_of(result) -> list[int]:
    return [t.id for t in result[0]]


# -- batching -------------------------------------------------------------------------------------------------


def test_mixed_adapter_batch_matches_single_runs(state):
    en, zh = rows_of(EN), rows_of(ZH)
    requests, answers = [], []
    for i in range(8):  # interleaved: both adapters and the base model in every forward pass
        requests += [
            request(state, adapter=EN, row=en[i]),
            request(state, adapter=ZH, row=zh[i]),
            request(state, row=en[8 + i], max_new_tokens=24),
        ]
        answers += [en[i]["output"], zh[i]["output"], None]
    together = asyncio.run(run_together(make_engine(state), requests))
    alone = asyncio.run(run_alone(make_engine(state), requests))
    for i, (mixed, single, answer) in enumerate(zip(together, alone, answers)):
        assert isinstance(mixed[1], FinalEvent) and isinstance(single[1], FinalEvent)
        assert ids_of(mixed) == ids_of(single), f"row {i}: batched tokens differ from the single run"
        assert mixed[1].generated_text == single[1].generated_text
        if answer is not None:
            assert mixed[1].generated_text == answer, i
            assert mixed[1].finish_reason == "eos_token"


def test_rows_finishing_at_different_steps_leave_the_others_intact(state):
    """Prompts of different lengths, and rows leaving (their KV slots refilled) as they finish."""
    prompts = [
        ENDLESS,
        "a",
        "Once upon a time",
        "The quick brown fox jumps over the lazy dog. " * 6,
        "0123456789",
        "中国的首都是北京。",
        "Question: Who wrote the poem? Answer:",
        "hello",
    ]
    requests = [request(state, inputs=p, max_new_tokens=n) for p, n in zip(prompts, (40, 3, 25, 9, 33, 17, 1, 40))]
    together = asyncio.run(run_together(make_engine(state), requests))
    alone = asyncio.run(run_alone(make_engine(state), requests))
    for i, (mixed, single) in enumerate(zip(together, alone)):
        assert ids_of(mixed) == ids_of(single), f"row {i} ({prompts[i]!r})"
        assert mixed[1].finish_reason == single[1].finish_reason
        assert mixed[1].generated_tokens == len(mixed[0]) <= requests[i][1].max_new_tokens


def test_seeded_sampling_is_the_same_alone_and_batched(state):
    requests = [
        request(state, inputs=ENDLESS, max_new_tokens=20, do_sample=True, temperature=1.3, seed=seed)
        for seed in (1, 2, 3, 1)
    ]
    together = asyncio.run(run_together(make_engine(state), requests))
    alone = asyncio.run(run_alone(make_engine(state), requests))
    assert [ids_of(r) for r in together] == [ids_of(r) for r in alone]
    assert ids_of(together[0]) == ids_of(together[3])  # same seed, same tokens, even in the same batch
    assert len({tuple(ids_of(r)) for r in together}) >= 2
    assert all(t.logprob <= 0 for r in together for t in r[0])


def test_late_arrivals_join_the_running_batch_and_match_single_runs(state):
    """Continuous batching: requests submitted while another generates join its batch (one forward
    pass per step for all of them), with prompts of other lengths and another adapter, and still equal
    their single runs.
    Each request is submitted only once the one before it has produced a token, so every one of them
    arrives mid-generation whatever the machine's speed (the first runs 300 tokens)."""
    prompts = [ENDLESS, "Once upon a time", "0123456789", "The quick brown fox jumps over the lazy dog."]
    requests = [request(state, inputs=p, max_new_tokens=300 if i == 0 else 40) for i, p in enumerate(prompts)]
    en_row = rows_of(EN)[2]
    requests += [request(state, adapter=EN, row=en_row), request(state, adapter=EN, row=rows_of(EN)[3])]

    engine = make_engine(state)
    results = asyncio.run(run_staggered(engine, requests))
    alone = asyncio.run(run_alone(make_engine(state), requests))
    # One pass advances every running sequence and takes in newcomers' prompts: the run takes about as
    # many steps as its longest request has tokens, where one batch at a time would take their sum (454).
    longest = max(final.generated_tokens for _, final in results)
    assert engine.stats.steps <= longest + len(requests), (engine.stats.steps, longest)
    for i, (mixed, single) in enumerate(zip(results, alone)):
        assert ids_of(mixed) == ids_of(single), f"request {i}"
    assert results[-2][1].generated_text == en_row["output"]


def test_steps_with_prompt_chunks_run_piecewise_give_the_eager_tokens(state):
    """The piecewise path (piecewise_graphs.py) with its pieces run eagerly, as a CPU allows: prompts joining
    running streams (decode rows and a chunk in one step, padded to a token bucket), with and without
    adapters, give the tokens of the plain eager pass token for token, and the buckets were really used."""
    from server.engine.piecewise_graphs import PiecewiseGraphs

    prompts = [ENDLESS, "Once upon a time", "0123456789"]
    requests = [request(state, inputs=p, max_new_tokens=60 if i == 0 else 20) for i, p in enumerate(prompts)]
    requests += [request(state, adapter=EN, row=rows_of(EN)[1]), request(state, adapter=ZH, row=rows_of(ZH)[2])]
    eager = asyncio.run(run_staggered(make_engine(state), requests))
    pieces = state.runner.pieces = PiecewiseGraphs(state.runner.decoder, capture=False)
    try:
        piecewise = asyncio.run(run_staggered(make_engine(state), requests))
    finally:
        state.runner.pieces = None
    assert pieces.enabled
    used = {key for key, entry in pieces._pieces.items() if entry.replays}
    assert {with_lora for _, with_lora in used} == {True, False}, used
    for i, (ours, plain) in enumerate(zip(piecewise, eager)):
        assert ids_of(ours) == ids_of(plain), f"request {i}"


# -- cancellation, capacity, shutdown -------------------------------------------------------------------------


def wait_until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_closing_the_stream_cancels_within_a_step(state):
    engine = make_engine(state)
    engine.start()

    async def read_two_then_close():
        events = engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=1000))
        assert isinstance(await anext(events), TokenEvent)
        assert isinstance(await anext(events), TokenEvent)
        assert engine.in_flight == 1
        await events.aclose()

    try:
        asyncio.run(read_two_then_close())
        assert wait_until(lambda: engine.in_flight == 0 and engine.stats.running == 0, timeout=2.0), engine.stats
        produced = engine.stats.generated_tokens
        time.sleep(0.3)
        assert engine.stats.generated_tokens == produced < 100
    finally:
        engine.stop()


def test_over_capacity_is_refused_at_once_and_the_slot_comes_back(state):
    engine = make_engine(state, max_running=1, max_queue=1)
    engine.start()

    async def scenario():
        long = request(state, inputs=ENDLESS, max_new_tokens=60)
        first, second = engine.generate(*long), engine.generate(*long)  # one running, one queued
        with pytest.raises(Overloaded) as refused:
            engine.generate(*long)
        assert refused.value.headers.get("Retry-After")
        assert engine.in_flight == 2
        results = await asyncio.gather(drain(first), drain(second))
        assert all(isinstance(final, FinalEvent) and final.finish_reason == "length" for _, final in results)
        assert engine.in_flight == 0
        return await drain(engine.generate(*request(state, adapter=EN, row=rows_of(EN)[0])))

    try:
        _, final = asyncio.run(scenario())
        assert final.generated_text == rows_of(EN)[0]["output"]
    finally:
        engine.stop()


def test_abort_all_fails_running_and_waiting_requests(state):
    engine = make_engine(state, max_running=1, max_queue=4)
    engine.start()

    async def scenario():
        streams = [engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=1000)) for _ in range(3)]
        assert isinstance(await anext(streams[0]), TokenEvent)  # one runs, two wait
        engine.abort_all("the server is shutting down")
        results = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 10)
        engine.stop_accepting()
        with pytest.raises(Unavailable):
            engine.generate(*request(state, inputs="hello"))
        return results

    try:
        results = asyncio.run(scenario())
        for _, final in results:
            assert isinstance(final, ErrorEvent) and final.message == "the server is shutting down"
        assert engine.in_flight == 0
    finally:
        engine.stop()


def test_adapter_jobs_run_between_steps_while_generating(state):
    """`call` runs on the worker thread (the only one that may touch the model) even under load."""
    engine = make_engine(state)
    engine.start()

    async def scenario():
        events = engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=200))
        await anext(events)
        thread = await asyncio.wait_for(engine.call(lambda: threading.current_thread().name), 5)
        with pytest.raises(ZeroDivisionError):
            await engine.call(lambda: 1 / 0)  # an error reaches the caller; the worker keeps going
        _, final = await drain(events)
        return thread, final

    try:
        thread, final = asyncio.run(scenario())
        assert thread == "loraserve-engine"
        assert isinstance(final, FinalEvent) and final.generated_tokens == 200
    finally:
        engine.stop()


def test_out_of_memory_in_a_prefill_fails_only_those_requests_and_the_engine_recovers(state, monkeypatch):
    """DESIGN hostile input 20: an OOM mid-generation. The step that failed was prefilling newcomers (the
    memory-hungry part): those requests fail, the running ones finish exactly, and the next request
    for the same adapter succeeds."""
    decoder = state.runner.decoder
    real_forward = decoder.forward
    armed = {"on": False}

    def forward_with_oom(step):
        if armed["on"] and step.chunks:
            armed["on"] = False
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(step)

    en_rows, zh_rows = rows_of(EN)[:2], rows_of(ZH)[:2]

    async def oom_then_retry(engine: Engine):
        engine.start()
        running = [engine.generate(*request(state, adapter=EN, row=r)) for r in en_rows]
        firsts = [await anext(s) for s in running]  # both decoding now
        armed["on"] = True
        newcomers = [engine.generate(*request(state, adapter=ZH, row=r)) for r in zh_rows]
        failed = await asyncio.gather(*(drain(s) for s in newcomers))
        finished = await asyncio.gather(*(drain(s) for s in running))
        assert engine.in_flight == 0
        again = await drain(engine.generate(*request(state, adapter=ZH, row=zh_rows[0])))
        return firsts, finished, failed, again

    engine = make_engine(state)
    monkeypatch.setattr(decoder, "forward", forward_with_oom)
    try:
        firsts, finished, failed, again = asyncio.run(oom_then_retry(engine))
    finally:
        engine.stop()
    for first, (tokens, final), row in zip(firsts, finished, en_rows):
        assert isinstance(final, FinalEvent) and first.text + "".join(t.text for t in tokens) == row["output"]
    for _, final in failed:
        assert isinstance(final, ErrorEvent) and "OutOfMemoryError" in final.message
    assert isinstance(again[1], FinalEvent) and again[1].generated_text == zh_rows[0]["output"]


# -- KV slots and adapter slots ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state(tiny_model_dir, trained_adapters):
    """A server with 2 KV slots and 1 device adapter slot: most requests wait, adapters take turns."""
    return served_state(tiny_model_dir, trained_adapters, max_running=2, adapter_slots=1)


def test_full_kv_cache_and_adapter_slots_queue_requests_instead_of_failing(small_state, monkeypatch):
    state = small_state
    decoder, rows_seen = state.runner.decoder, []
    real_forward = decoder.forward

    def recording_forward(step):
        rows_seen.append((step.decode_rows, len(step.chunks), set(step.lora_slots.tolist()) - {-1}))
        return real_forward(step)

    monkeypatch.setattr(decoder, "forward", recording_forward)
    en, zh = rows_of(EN), rows_of(ZH)
    requests = [request(state, adapter=EN if i % 2 else ZH, row=(en if i % 2 else zh)[i]) for i in range(8)]
    requests.append(request(state, inputs="hello", max_new_tokens=12))
    uploads = state.runner.lora.uploads
    results = asyncio.run(run_together(make_engine(state, max_running=32), requests))
    for i, (_, final) in enumerate(results[:8]):
        assert isinstance(final, FinalEvent), final
        assert final.generated_text == (en if i % 2 else zh)[i]["output"], i
    assert isinstance(results[8][1], FinalEvent) and results[8][1].generated_tokens == 12
    assert max(max(rows, chunks) for rows, chunks, _ in rows_seen) <= 2  # never more running than KV slots
    assert all(len(slots) <= 1 for _, _, slots in rows_seen)  # one device adapter slot
    assert state.runner.lora.uploads - uploads >= 2  # adapters were evicted and uploaded again
    assert state.runner.cache.used == 0 and not state.runner.lora.pins


def test_kernel_launches_do_not_grow_with_distinct_adapters(state):
    """Batched LoRA: a pass over rows of two adapters and the base model runs the same operations as a
    pass whose rows all use one adapter (no per-adapter loop)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from server.engine.decoder import Step
    from tests.steps import prompt_step

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    runner = state.runner
    keys = [state.registry.get(EN).key, state.registry.get(ZH).key]
    prompts = [runner.tokenizer(p).input_ids for p in ("The capital of France is", "hello there", "0123", "a b c d")]

    def ops_for(adapters: list[str | None]) -> list[str]:
        slots = [runner.lora.acquire(k) if k else -1 for k in adapters]
        steps = [prompt_step(ids, slot=i, lora_slot=s) for i, (ids, s) in enumerate(zip(prompts, slots))]
        step = Step(
            **{
                f: torch.cat([getattr(s, f) for s in steps])
                for f in ("ids", "positions", "write_slots", "write_positions", "lora_slots")
            },
            decode_rows=0,
            decode_lengths=steps[0].decode_lengths,
            decode_span=0,
            any_adapter=True,
            chunks=[s.chunks[0] for s in steps],
            logit_rows=torch.tensor([len(p) for p in prompts]).cumsum(0) - 1,
        )  # each prompt's last token
        try:
            with CountOps() as counter:
                runner.decoder.forward(step)
            return counter.ops
        finally:
            for key in adapters:
                if key:
                    runner.lora.release(key)

    one = ops_for([keys[0]] * 4)
    mixed = ops_for([keys[0], keys[1], None, keys[0]])
    assert len(one) > 100 and one == mixed
    assert any("mm" in op for op in one)


def test_a_long_prompt_prefills_in_chunks_while_running_streams_keep_decoding(state):
    """A newcomer's long prompt does not stall running streams: it is prefilled `prefill_chunk_tokens`
    at a time, and every one of those steps still gives the running stream its next token."""
    engine = make_engine(state, prefill_chunk_tokens=32)
    long_prompt = request(state, inputs="The quick brown fox jumps over the lazy dog. " * 20, max_new_tokens=3)
    chunks = -(-len(long_prompt[0]) // 32)
    assert chunks >= 5

    async def scenario():
        engine.start()
        running = engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=300))
        await anext(running)
        steps_before = engine.stats.steps
        newcomer = engine.generate(*long_prompt)
        first = await anext(newcomer)  # the newcomer's prompt is all in the cache now
        steps_to_first = engine.stats.steps - steps_before
        tokens, final = await drain(running)
        await drain(newcomer)
        return first, steps_to_first, tokens, final

    try:
        first, steps_to_first, tokens, final = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(first, TokenEvent) and isinstance(final, FinalEvent)
    assert steps_to_first >= chunks  # one chunk a step ...
    assert final.generated_tokens == 300 and engine.stats.steps <= 300 + 2  # ... inside the running stream's steps


def test_a_request_waiting_for_an_adapter_slot_is_not_starved_by_resident_adapters(small_state):
    """One device adapter slot, held by a running EN request. A ZH request waits for it; an EN request
    arriving after ZH must not jump the queue on the resident adapter (with a steady EN stream, ZH
    would otherwise never get the slot)."""
    state = small_state
    en, zh = rows_of(EN), rows_of(ZH)
    started: dict[str, float] = {}

    async def first_token_then_rest(name: str, stream):
        await anext(stream)
        started[name] = time.monotonic()
        return await drain(stream)

    async def scenario(engine: Engine):
        engine.start()
        ids, params, key = request(state, adapter=EN, row=en[0])
        first = engine.generate(ids, dataclasses.replace(params, max_new_tokens=300, stop_token_ids=()), key)
        await anext(first)  # EN holds the only adapter slot now, for 300 tokens
        zh_task = asyncio.ensure_future(
            first_token_then_rest("zh", engine.generate(*request(state, adapter=ZH, row=zh[0])))
        )
        await asyncio.sleep(0.05)  # ZH is waiting for the slot
        en_task = asyncio.ensure_future(
            first_token_then_rest("en2", engine.generate(*request(state, adapter=EN, row=en[1])))
        )
        await drain(first)
        return await asyncio.gather(zh_task, en_task)

    engine = make_engine(state)
    try:
        (_, zh_final), (_, en_final) = asyncio.run(scenario(engine))
    finally:
        engine.stop()
    assert zh_final.generated_text == zh[0]["output"] and en_final.generated_text == en[1]["output"]
    assert started["zh"] < started["en2"]


EN_AGAIN = "en-again"  # EN's files under another name: a third adapter with a device slot of its own


@pytest.fixture(scope="module")
def two_slot_state(tiny_model_dir, trained_adapters):
    """4 KV slots, 2 device adapter slots, 3 adapters: one of them is always off the device."""
    return served_state(
        tiny_model_dir, trained_adapters, max_running=4, adapter_slots=2, adapters={EN: EN, ZH: ZH, EN_AGAIN: EN}
    )


def test_while_one_slot_drains_for_a_waiting_adapter_the_other_resident_adapters_keep_serving(two_slot_state):
    """Both device slots are pinned (a long EN and a longer ZH request) when a request for a third adapter
    arrives: it waits for the slot that frees first (EN's: as few requests, used less recently). A ZH
    request after it starts at once, without waiting for any slot to drain; an EN request after it waits
    behind it (else EN's slot might never drain)."""
    state = two_slot_state
    en, zh = rows_of(EN), rows_of(ZH)
    started: dict[str, float] = {}
    ended: dict[str, float] = {}

    def endless(adapter: str, row: dict, tokens: int):
        ids, params, key = request(state, adapter=adapter, row=row)
        return ids, dataclasses.replace(params, max_new_tokens=tokens, stop_token_ids=()), key

    async def timed(name: str, stream):
        await anext(stream)
        started[name] = time.monotonic()
        result = await drain(stream)
        ended[name] = time.monotonic()
        return result

    async def scenario(engine: Engine):
        engine.start()
        long_en = asyncio.ensure_future(timed("long_en", engine.generate(*endless(EN, en[0], 150))))
        long_zh = asyncio.ensure_future(timed("long_zh", engine.generate(*endless(ZH, zh[0], 400))))
        while len(started) < 2:  # both slots pinned
            await asyncio.sleep(0.005)
        third = asyncio.ensure_future(timed("third", engine.generate(*request(state, adapter=EN_AGAIN, row=en[1]))))
        await asyncio.sleep(0.05)  # the third adapter waits for a slot
        zh_short = asyncio.ensure_future(timed("zh_short", engine.generate(*request(state, adapter=ZH, row=zh[1]))))
        en_short = asyncio.ensure_future(timed("en_short", engine.generate(*request(state, adapter=EN, row=en[2]))))
        return await asyncio.gather(third, zh_short, en_short, long_en, long_zh)

    engine = make_engine(state)
    try:
        (_, third), (_, zh_final), (_, en_final), *_ = asyncio.run(asyncio.wait_for(scenario(engine), 120))
    finally:
        engine.stop()
    assert third.generated_text == en[1]["output"] and zh_final.generated_text == zh[1]["output"]
    assert en_final.generated_text == en[2]["output"]
    assert started["zh_short"] < ended["long_en"], "a resident adapter's request waited for a slot to drain"
    assert ended["long_en"] <= started["third"] < ended["long_zh"], "the third adapter took EN's slot when it freed"
    assert started["third"] <= started["en_short"], "an EN request passed the one waiting for EN's slot"


# -- faults inside the worker -----------------------------------------------------------------------------------


def test_an_unexpected_error_fails_the_running_requests_and_the_engine_goes_on(state, monkeypatch):
    import server.engine.engine as engine_module

    real = engine_module.choose_tokens
    calls = {"n": 0}

    def broken_once(logits, seqs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a bug in sampling (simulated)")
        return real(logits, seqs)

    monkeypatch.setattr(engine_module, "choose_tokens", broken_once)
    engine = make_engine(state)

    async def scenario():
        engine.start()
        failed = await drain(engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=50)))
        after = await drain(engine.generate(*request(state, adapter=EN, row=rows_of(EN)[0])))
        return failed, after

    try:
        (_, failed), (_, after) = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    assert isinstance(failed, ErrorEvent) and "internal error" in failed.message
    assert isinstance(after, FinalEvent) and after.generated_text == rows_of(EN)[0]["output"]
    assert engine.in_flight == 0


def test_non_finite_logits_fail_only_their_row(state, monkeypatch):
    runner = state.runner
    real = runner.forward
    target = {}

    def nan_for_one_row(step):
        logits = real(step).clone()  # an inference tensor cannot be edited outside inference mode
        seq = target.get("seq")
        if seq is not None and seq.slot is not None and step.decode_rows and not step.chunks:
            row = step.logit_rows.tolist().index(seq.slot)
            logits[row] = float("nan")
        return logits

    monkeypatch.setattr(runner, "forward", nan_for_one_row)
    engine = make_engine(state)
    en = rows_of(EN)

    async def scenario():
        engine.start()
        streams = [engine.generate(*request(state, adapter=EN, row=en[i])) for i in range(3)]
        firsts = [await anext(s) for s in streams]
        target["seq"] = engine._slots[0]
        results = await asyncio.gather(*(drain(s) for s in streams))
        return firsts, results

    try:
        firsts, results = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    errors = [final for _, final in results if isinstance(final, ErrorEvent)]
    assert len(errors) == 1 and "non-finite" in errors[0].message
    for i, (first, (tokens, final)) in enumerate(zip(firsts, results)):
        if isinstance(final, FinalEvent):
            assert first.text + "".join(t.text for t in tokens) == en[i]["output"]


def test_a_stopped_engine_refuses_new_work_instead_of_hanging(state):
    from server.errors import Unavailable

    engine = make_engine(state)
    engine.start()
    engine.stop()

    async def after_stop():
        with pytest.raises(Unavailable):
            engine.generate(*request(state, inputs="hello"))
        with pytest.raises(Unavailable):
            await asyncio.wait_for(engine.call(lambda: 1), 5)

    asyncio.run(after_stop())


def test_a_decode_row_that_breaks_every_step_fails_itself_not_each_newcomer(state, monkeypatch):
    """A forward pass that fails whenever one running sequence is in it, while newcomers keep arriving:
    the first failure blames the newcomer's prefill (usually right: out of memory), the second blames
    the running rows too, and the requests after that are served."""
    runner = state.runner
    real = runner.forward
    bad: dict = {}

    def fails_with_the_bad_row(step):
        seq = bad.get("seq")
        bad["armed"] = bad.get("armed") or (seq is not None and bool(step.chunks))  # from the first newcomer on
        if bad["armed"] and seq.slot is not None and seq.slot < step.decode_rows and not seq.done:
            if bad["newcomers"]:  # the next arrival, in the engine's inbox before the retry
                bad["arrived"].clear()
                bad["loop"].call_soon_threadsafe(bad["newcomers"].pop(0))
                assert bad["arrived"].wait(10)
            raise RuntimeError("kernel error (simulated)")
        return real(step)

    monkeypatch.setattr(runner, "forward", fails_with_the_bad_row)
    engine = make_engine(state)
    en = rows_of(EN)

    async def scenario():
        engine.start()
        loop = asyncio.get_running_loop()
        running = engine.generate(*request(state, inputs=ENDLESS, max_new_tokens=300))
        await anext(running)
        tasks = []

        def arrival(i):
            def submit():
                tasks.append(asyncio.ensure_future(drain(engine.generate(*request(state, adapter=EN, row=en[i])))))
                bad["arrived"].set()

            return submit

        bad.update(seq=engine._slots[0], loop=loop, newcomers=[arrival(1), arrival(2)], arrived=threading.Event())
        arrival(0)()
        running_result = await asyncio.wait_for(drain(running), 30)

        async def all_arrived():
            while len(tasks) < 3:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(all_arrived(), 30)
        return running_result, await asyncio.wait_for(asyncio.gather(*tasks), 30)

    try:
        (_, running_final), newcomers = asyncio.run(scenario())
    finally:
        engine.stop()
    assert isinstance(running_final, ErrorEvent)
    outcomes = [isinstance(final, FinalEvent) for _, final in newcomers]
    assert outcomes == [False, False, True], outcomes  # blamed once, then with the bad row; then served
    assert newcomers[2][1].generated_text == en[2]["output"]


def test_unsloth_is_never_asked_for_more_context_than_the_model_has(tiny_model_dir, monkeypatch):
    """Asked for a longer max_seq_length, Unsloth rescales RoPE behind our back: every output changes
    and adapters trained on the base no longer match its fingerprint. The cap must come before loading."""
    from transformers import AutoConfig

    import server.engine.runner as runner_module

    asked = {}

    def load_like_unsloth(base_model, *, load_in_4bit, max_context, dtype):
        asked["max_context"] = max_context
        return runner_module._load_transformers(base_model, dtype=dtype)

    monkeypatch.setattr(runner_module, "choose_backend", lambda requested: requested)
    monkeypatch.setattr(runner_module, "_load_unsloth", load_like_unsloth)
    runner = runner_module.load_runner(str(tiny_model_dir), backend="unsloth", load_in_4bit=False, max_context=1 << 20)
    limit = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    assert asked["max_context"] == limit and runner.max_context == limit


def test_the_dtype_setting_chooses_the_weights_and_kv_cache_dtype(tiny_model_dir):
    """`DTYPE`: auto is float32 on a CPU; bfloat16 asked for is what the weights and the KV cache hold, and the
    engine still generates (a CPU has bfloat16 matmuls)."""
    from server.engine.runner import load_runner

    auto = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False, kv_slots=2)
    half = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False, kv_slots=2, dtype="bfloat16")
    assert (auto.dtype, auto.cache.K[0].dtype) == (torch.float32, torch.float32)
    assert (half.dtype, half.cache.K[0].dtype) == (torch.bfloat16, torch.bfloat16)
    ids = half.tokenizer("The capital of France is", add_special_tokens=True).input_ids
    engine = Engine(half, max_running=2, max_queue=2)

    async def generate():
        engine.start()
        return await drain(engine.generate(ids, SamplingParams(max_new_tokens=8, stop_token_ids=()), None))

    try:
        _, final = asyncio.run(generate())
    finally:
        engine.stop()
    assert isinstance(final, FinalEvent) and final.generated_tokens == 8


def test_an_adapter_that_fails_to_upload_fails_its_request_not_every_step(state, monkeypatch):
    """An error moving an adapter to its device slot fails the request that needed it; left waiting,
    it would raise again at every step and fail every running request for ever."""
    lora = state.runner.lora
    real = lora.acquire

    def broken_for_zh(key):
        if key == state.registry.get(ZH).key:
            raise RuntimeError("device error while uploading (simulated)")
        return real(key)

    monkeypatch.setattr(lora, "acquire", broken_for_zh)
    engine = make_engine(state)
    running = request(state, adapter=EN, row=rows_of(EN)[0])
    doomed = request(state, adapter=ZH, row=rows_of(ZH)[0])

    async def scenario():
        streams = [engine.generate(*running), engine.generate(*doomed)]  # admitted in the same step
        engine.start()
        return await asyncio.gather(*(drain(s) for s in streams))

    try:
        (_, ok), (_, failed) = asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        engine.stop()
    assert isinstance(failed, ErrorEvent) and "could not be moved to the device" in failed.message
    assert isinstance(ok, FinalEvent) and ok.generated_text == rows_of(EN)[0]["output"]
    assert engine.in_flight == 0
