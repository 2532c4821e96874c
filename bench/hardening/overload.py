"""Overload at 2x capacity: closed-loop clients at twice what the server admits (running + queued).

First an unloaded run at the server's batch size (no queue), then the overload run. A client refused
with 429 tries again 50 ms later, so the offered load stays at 2x. Must hold: every refusal is a 429
with Retry-After and an error body, every admitted request completes with exactly its tokens and its
own text (nothing queued is lost), and nothing else happens. Figures: the 429s' latency, and TTFT / TPOT
of admitted requests against the unloaded run (queued requests wait for a batch slot: TTFT includes it).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import httpx

from bench.hardening.client import TIMEOUT, Outcome, scrape, stream
from bench.hardening.report import Report, ms
from bench.hardening.versions import Timeline, expected_texts, judge
from bench.hardening.world import PROMPTS, World

RUNNING, QUEUE = 4, 4  # capacity: 8 admitted at once


@dataclass(frozen=True)
class Size:
    admitted: int  # requests answered per phase
    max_new_tokens: int = 32


QUICK, FULL = Size(admitted=16), Size(admitted=400)


def run(world: World, size: Size = QUICK) -> Report:
    server = world.serve(preload=world.names, label="overload", max_running=RUNNING, max_queue=QUEUE)
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    limits = httpx.Limits(max_connections=4 * (RUNNING + QUEUE))
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        texts = await expected_texts(
            client, world, server.admin_token, max_new_tokens=size.max_new_tokens, live=world.names, paths=[]
        )
        timeline = Timeline()
        for name in world.names:
            timeline.preloaded(name, (await client.get(f"/adapters/{name}")).json()["version"])
        unloaded, engine_unloaded = await _measured(client, world, size, concurrency=RUNNING)
        loaded, engine_loaded = await _measured(client, world, size, concurrency=2 * (RUNNING + QUEUE))
    report = Report("overload")
    report.failures += world.log_problems(server)
    refused = [out for out in loaded if out.status == 429]
    for out in unloaded + [out for out in loaded if out.status != 429]:
        failure = judge(out, texts, timeline)
        report.check(failure is None, failure or "")
        report.check(not out.ok or out.final["generated_tokens"] == size.max_new_tokens, f"short answer: {out.final}")
    for out in refused:
        report.check(out.retry_after is not None and out.retry_after.isdigit(), f"429 without Retry-After: {out}")
        report.check("error" in (out.error or ""), f"429 without an error body: {out.error}")
    admitted = [out for out in loaded if out.ok]
    report.figures = {
        "capacity (running + queued)": f"{RUNNING} + {QUEUE}",
        "offered concurrency": 2 * (RUNNING + QUEUE),
        "requests sent / answered / 429": f"{len(loaded)} / {len(admitted)} / {len(refused)}",
        "429 latency p50 / p99 ms": f"{ms(_latency(refused), 50)} / {ms(_latency(refused), 99)}",
        "TTFT p50 / p99 ms, unloaded (4 streams)": _pair(unloaded, "ttft"),
        "TTFT p50 / p99 ms, admitted at 2x": _pair(admitted, "ttft"),
        "TPOT p50 / p99 ms, unloaded": _pair(unloaded, "tpot"),
        "TPOT p50 / p99 ms, admitted at 2x": _pair(admitted, "tpot"),
        "server-side mean inter-token ms, unloaded / 2x": f"{engine_unloaded} / {engine_loaded}",
    }
    return report


async def _measured(client: httpx.AsyncClient, world: World, size: Size, *, concurrency: int):
    """The closed loop's outcomes, and the server's own mean time between tokens meanwhile (ms): what the
    engine sustained, apart from what the clients' share of the CPU added on their side."""
    before = await scrape(client)
    outcomes = await _closed_loop(client, world, size, concurrency=concurrency)
    after = await scrape(client)
    total, count = (
        after[k] - before[k] for k in ("loraserve_inter_token_seconds_sum", "loraserve_inter_token_seconds_count")
    )
    return outcomes, round(total / count * 1000, 1) if count else None


async def _closed_loop(client: httpx.AsyncClient, world: World, size: Size, *, concurrency: int) -> list[Outcome]:
    """`concurrency` clients, each sending its next request when its last one ended, until `admitted` answers."""
    outcomes: list[Outcome] = []
    answered = 0

    async def worker(seed: int) -> None:
        nonlocal answered
        rng = random.Random(seed)
        while answered < size.admitted:
            adapter, prompt = rng.choice([*world.names, None]), rng.randrange(len(PROMPTS))
            out = await stream(client, PROMPTS, prompt, adapter, max_new_tokens=size.max_new_tokens)
            outcomes.append(out)
            answered += out.status != 429
            if out.status == 429:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(seed) for seed in range(concurrency)))
    return outcomes


def _latency(outcomes: list[Outcome]) -> list[float]:
    return [out.done_at - out.sent for out in outcomes]


def _pair(outcomes: list[Outcome], what: str) -> str:
    values = [getattr(out, what) for out in outcomes if getattr(out, what) is not None]
    return f"{ms(values, 50)} / {ms(values, 99)}"
