"""Drain: SIGTERM with open streams, half of them short enough to finish inside the drain window.

Must hold: /ready turns 503 (its latency is a figure), a new request is refused, every stream either
completes normally with all its tokens or, still running when the window closes, ends with an in-band
error event (never a cut without one), every long stream is cut so, and the process exits 0. How many
short streams finished inside the window is a figure (a machine slow enough would cut them too).
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

import httpx

from bench.hardening.client import TIMEOUT, Outcome, stream
from bench.hardening.report import Report
from bench.hardening.world import PROMPTS, World

# New tokens: about a second's worth at 32 streams on a 2-core box (they finish inside the window, but
# not before the signal) / far more than the window allows.
SHORT, LONG = 96, 1000


@dataclass(frozen=True)
class Size:
    streams: int = 32
    drain_seconds: float = 4.0


QUICK = FULL = Size()


def run(world: World, size: Size = QUICK) -> Report:
    server = world.serve(preload=world.names, label="drain", drain_seconds=size.drain_seconds)
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    limits = httpx.Limits(max_connections=size.streams + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        lengths = [SHORT if i % 2 else LONG for i in range(size.streams)]
        adapters = [[*world.names, None][i % (len(world.names) + 1)] for i in range(size.streams)]
        streams = [
            asyncio.create_task(stream(client, PROMPTS, i % len(PROMPTS), adapter, max_new_tokens=n))
            for i, (adapter, n) in enumerate(zip(adapters, lengths))
        ]
        await _all_streaming(client, size.streams)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        not_ready_after = await _until_not_ready(client, signalled)
        refused = await _refused(client)
        outcomes = await asyncio.gather(*streams)
    exit_code = await asyncio.to_thread(server.proc.wait, 30)
    exited_after = time.monotonic() - signalled
    report = Report("drain")
    report.failures += world.log_problems(server)
    report.check(not_ready_after is not None, "/ready never turned 503")
    report.check(refused, "a request after SIGTERM was not refused")
    report.check(exit_code == 0, f"exit status {exit_code}")
    for out, n in zip(outcomes, lengths):
        finished = out.ok and out.final["generated_tokens"] == n
        cut = out.status == 200 and out.final is None and out.error is not None and "shutting down" in out.error
        report.check(finished or cut, f"{n}-token stream ended: status {out.status}, {out.error}")
        report.check(n == SHORT or cut, f"a {n}-token stream was not cut at the end of the window")
    normal = [o for o in outcomes if o.ok]
    report.figures = {
        "open streams at SIGTERM (short / long)": f"{lengths.count(SHORT)} / {lengths.count(LONG)}",
        "drain window s": size.drain_seconds,
        "/ready 503 after ms": None if not_ready_after is None else round(not_ready_after * 1000, 1),
        "completed normally (short / long)": f"{sum(o.final['generated_tokens'] == SHORT for o in normal)} / "
        f"{sum(o.final['generated_tokens'] == LONG for o in normal)}",
        "ended with an in-band error event": sum(
            o.status == 200 and not o.ok and o.error is not None for o in outcomes
        ),
        "last short stream done, s after SIGTERM": _last_done(outcomes, lengths, SHORT, signalled),
        "exit status / s after SIGTERM": f"{exit_code} / {exited_after:.1f}",
    }
    return report


async def _all_streaming(client: httpx.AsyncClient, streams: int, timeout: float = 60.0) -> None:
    """Until every stream runs (each holds a KV slot): then all are open when the signal comes."""
    from bench.hardening.client import scrape

    deadline = time.monotonic() + timeout
    while (await scrape(client))["loraserve_running_generations"] < streams and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def _until_not_ready(client: httpx.AsyncClient, since: float, timeout: float = 5.0) -> float | None:
    while time.monotonic() - since < timeout:
        try:
            if (await client.get("/ready", timeout=1)).status_code == 503:
                return time.monotonic() - since
        except httpx.TransportError:
            return time.monotonic() - since  # the listener is closed: as unready as it gets
        await asyncio.sleep(0.01)
    return None


async def _refused(client: httpx.AsyncClient) -> bool:
    try:
        response = await client.post("/generate", json={"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 2}})
    except httpx.TransportError:
        return True
    return response.status_code == 503


def _last_done(outcomes: list[Outcome], lengths: list[int], n: int, since: float) -> float | None:
    done = [o.done_at - since for o, length in zip(outcomes, lengths) if length == n and o.ok]
    return round(max(done), 2) if done else None
