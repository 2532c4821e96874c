"""Hot swap under load: one adapter reloaded every second, as another version each time, while
closed-loop clients stream from it (and from the others and the base model).

Must hold: zero errors, every answer is exactly one version's own text (no response mixes versions),
and every request answered on a version live before its first token came back: the one it started
with, whatever reloads came while it ran. Figures: reloads, requests, how many spanned a
reload, and the reload latency.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from bench.hardening.client import TIMEOUT, Outcome, admin, stream
from bench.hardening.report import Report, ms
from bench.hardening.versions import Timeline, expected_texts, judge
from bench.hardening.world import PROMPTS, World


@dataclass(frozen=True)
class Size:
    reloads: int
    clients: int = 8
    every: float = 1.0  # seconds between reloads
    max_new_tokens: int = 48


QUICK, FULL = Size(reloads=6), Size(reloads=120)


@dataclass
class _Reload:
    name: str
    sent: float
    done: float


def run(world: World, size: Size = QUICK) -> Report:
    server = world.serve(preload=world.names, label="hot_swap")
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    swapped = world.names[0]
    limits = httpx.Limits(max_connections=size.clients + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        others = [world.path(swapped, k) for k in range(1, world.versions)]
        texts = await expected_texts(
            client, world, server.admin_token, max_new_tokens=size.max_new_tokens, live=world.names, paths=others
        )
        timeline = Timeline()
        for name in world.names:
            timeline.preloaded(name, (await client.get(f"/adapters/{name}")).json()["version"])
        stop = asyncio.Event()
        outcomes: list[Outcome] = []
        clients = [
            asyncio.create_task(_client(client, world, size, stop, outcomes, seed)) for seed in range(size.clients)
        ]
        reloads, failures = await _reload_every(client, server.admin_token, world, swapped, size, timeline)
        stop.set()
        await asyncio.gather(*clients)
    report = Report("hot_swap")
    report.failures += world.log_problems(server) + failures
    for out in outcomes:
        failure = judge(out, texts, timeline)
        report.check(failure is None, failure or "")
    for out in outcomes:  # pinned when it started: by its first token, whatever reloads came after
        started_on = (
            out.adapter != swapped or not out.ok or timeline.could_serve(swapped, out.version, out, by=out.first_at)
        )
        report.check(started_on, f"answered on {out.version}, which was not live before its first token")
    spanned = [(out, r) for out in outcomes for r in reloads if _spans(out, r)]
    report.figures = {
        "reloads (one a second)": len(reloads),
        "closed-loop clients": size.clients,
        "requests / on the swapped adapter": f"{len(outcomes)} / {sum(o.adapter == swapped for o in outcomes)}",
        "errors": sum(not o.ok for o in outcomes),
        "requests in flight across a reload": len({id(out) for out, _ in spanned}),
        "reload latency p50 / p99 ms": f"{ms([r.done - r.sent for r in reloads], 50)} / "
        f"{ms([r.done - r.sent for r in reloads], 99)}",
    }
    return report


def _spans(out: Outcome, reload: _Reload) -> bool:
    """Pinned before the reload was sent (its first token came back earlier) and still running after it."""
    return out.adapter == reload.name and out.ok and out.first_at < reload.sent and out.done_at > reload.done


async def _reload_every(client, token: str, world: World, name: str, size: Size, timeline: Timeline):
    reloads, failures = [], []
    for i in range(1, size.reloads + 1):
        await asyncio.sleep(size.every)
        sent = time.monotonic()
        response = await admin(client, token, "load", name, world.path(name, i))
        done = time.monotonic()
        if response.status_code != 200:
            failures.append(f"reload {i}: {response.status_code} {response.text[:200]}")
            continue
        timeline.published(name, response.json()["version"], sent=sent, done=done)
        reloads.append(_Reload(name=name, sent=sent, done=done))
    return reloads, failures


async def _client(client, world: World, size: Size, stop: asyncio.Event, outcomes: list, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        adapter = world.names[0] if rng.random() < 0.75 else rng.choice([*world.names[1:], None])
        outcomes.append(
            await stream(client, PROMPTS, rng.randrange(len(PROMPTS)), adapter, max_new_tokens=size.max_new_tokens)
        )
