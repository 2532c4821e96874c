"""Adapter churn: load / reload / unload cycles of several adapters while requests run.

Must hold: no request fails (a 404 only while its adapter was surely not loaded), every answer comes
from a version that could serve it and is that version's own text, every admin call succeeds, and at
the end the memory accounting is back to where it started (host copies, device slots, retired versions,
pins) with resident memory reported against its baseline. The versions differ in rank, so the device
slots grow and must shrink back.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

import httpx

from bench.hardening.client import TIMEOUT, admin, scrape, stream
from bench.hardening.report import Report, mib, ms
from bench.hardening.versions import Timeline, expected_texts, judge
from bench.hardening.world import PROMPTS, World

ACCOUNTING = (
    "loraserve_adapters_in_host_memory",
    "loraserve_adapter_host_bytes",
    "loraserve_adapter_device_bytes",
    "loraserve_adapter_versions_retired",
    "loraserve_adapter_slots_pinned",
    "loraserve_kv_slots_used",
)
# CUDA allocated memory is compared with the warm figure (after every version served once): the first
# requests allocate for good (a cuBLAS workspace per stream, 32 MiB on Hopper; the sampler's buffers).
# The graphs alive at the end may be other buckets than at warm-up: their static inputs and logits, KBs on
# the tiny model's 768-token vocabulary (rows x vocab floats: widen this for a large vocabulary); a leak per
# capture (32 MiB) or per cycle over 1,000 cycles would exceed this slack.
DEVICE_SLACK_BYTES = 4 << 20


@dataclass(frozen=True)
class Size:
    cycles: int  # each: load, reload as another version, unload (three admin calls)
    clients: int = 4
    max_new_tokens: int = 12


QUICK, FULL = Size(cycles=24), Size(cycles=1000)


def run(world: World, size: Size = QUICK) -> Report:
    server = world.serve(preload=world.names[:1], label="churn", adapter_slots=2)
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    limits = httpx.Limits(max_connections=size.clients + len(world.names) + 2)
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT, limits=limits) as client:
        stable, churned = world.names[0], world.names[1:]
        initial = await scrape(client)  # only the stable adapter, before any other was ever loaded
        every = [world.path(name, k) for name in churned for k in range(world.versions)]
        texts = await expected_texts(
            client, world, server.admin_token, max_new_tokens=size.max_new_tokens, live=[stable], paths=every
        )
        timeline = Timeline()
        timeline.preloaded(stable, (await client.get(f"/adapters/{stable}")).json()["version"])
        warm = await scrape(client)  # every version loaded once (probe): allocator arenas are warm
        churn = _Churn(client, server.admin_token, world, timeline)
        started = time.monotonic()
        outcomes = await churn.run(churned, size)
        elapsed = time.monotonic() - started
        end = await _settled(client)
    report = Report("churn")
    report.failures += world.log_problems(server)
    for out in outcomes:
        failure = judge(out, texts, timeline)
        report.check(failure is None, failure or "")
    report.failures += churn.failures
    for name in ACCOUNTING:
        moved = f"{name}: {initial[name]:.0f} at the start, {end[name]:.0f} at the end"
        report.check(end[name] == initial[name], moved)
    device = "loraserve_device_allocated_bytes"
    grown = end[device] - warm[device]
    report.check(
        abs(grown) <= DEVICE_SLACK_BYTES, f"{device}: {warm[device]:.0f} once warm, {end[device]:.0f} at the end"
    )
    rss = "loraserve_engine_resident_memory_bytes"  # the engine's process: the server's own where it runs there
    report.figures = {
        "cycles (load + reload + unload)": size.cycles,
        "adapters churned / kept": f"{len(churned)} / 1",
        "admin calls": len(churn.latencies),
        "admin calls failed": len(churn.failures),
        "load/reload latency p50 / p99 ms": f"{ms(churn.load_latencies, 50)} / {ms(churn.load_latencies, 99)}",
        "requests answered": sum(out.ok for out in outcomes),
        "requests 404 (adapter not loaded then)": sum(out.status == 404 for out in outcomes),
        "requests failed": len(report.failures) - len(churn.failures),
        "seconds": round(elapsed, 1),
        "engine RSS MiB start / warm / end": f"{mib(initial[rss])} / {mib(warm[rss])} / {mib(end[rss])}",
        "engine RSS growth MiB vs warm (per 1,000 cycles)": round(mib(end[rss] - warm[rss]) * 1000 / size.cycles, 2),
        "adapter host / device bytes start": f"{initial['loraserve_adapter_host_bytes']:.0f} / "
        f"{initial['loraserve_adapter_device_bytes']:.0f}",
        "adapter host / device bytes end": f"{end['loraserve_adapter_host_bytes']:.0f} / "
        f"{end['loraserve_adapter_device_bytes']:.0f}",
        "device allocated MiB start / warm / end": f"{mib(initial[device])} / {mib(warm[device])} / {mib(end[device])}",
        "device allocated growth MiB vs warm (per 1,000 cycles)": round(mib(grown) * 1000 / size.cycles, 2),
    }
    return report


async def _settled(client: httpx.AsyncClient, timeout: float = 10.0) -> dict[str, float]:
    """/metrics once no request runs and no retired version waits (the last collect is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        numbers = await scrape(client)
        idle = numbers["loraserve_running_generations"] == 0 and numbers["loraserve_adapter_versions_retired"] == 0
        if idle or time.monotonic() > deadline:
            return numbers
        await asyncio.sleep(0.1)


class _Churn:
    """One admin task per churned name (loads of different names overlap), requests from `clients` more."""

    def __init__(self, client: httpx.AsyncClient, token: str, world: World, timeline: Timeline) -> None:
        self.client, self.token, self.world, self.timeline = client, token, world, timeline
        self.latencies: list[float] = []
        self.load_latencies: list[float] = []
        self.failures: list[str] = []

    async def run(self, churned: list[str], size: Size) -> list:
        stop = asyncio.Event()
        outcomes: list = []
        requesters = [asyncio.create_task(self._requests(size, stop, outcomes, seed)) for seed in range(size.clients)]
        per_name = [size.cycles // len(churned) + (i < size.cycles % len(churned)) for i in range(len(churned))]
        await asyncio.gather(*(self._cycles(name, count) for name, count in zip(churned, per_name)))
        stop.set()
        await asyncio.gather(*requesters)
        return outcomes

    async def _cycles(self, name: str, count: int) -> None:
        for i in range(count):
            await self._load(name, self.world.path(name, i))
            await self._load(name, self.world.path(name, i + 1))  # a reload: another version
            await self._unload(name)

    async def _load(self, name: str, path: str) -> None:
        sent = time.monotonic()
        response = await admin(self.client, self.token, "load", name, path)
        done = time.monotonic()
        self.latencies.append(done - sent)
        self.load_latencies.append(done - sent)
        if response.status_code != 200:
            self.failures.append(f"load {name} from {path}: {response.status_code} {response.text[:200]}")
            return
        self.timeline.published(name, response.json()["version"], sent=sent, done=done)

    async def _unload(self, name: str) -> None:
        sent = time.monotonic()
        response = await admin(self.client, self.token, "unload", name)
        done = time.monotonic()
        self.latencies.append(done - sent)
        if response.status_code != 200:
            self.failures.append(f"unload {name}: {response.status_code} {response.text[:200]}")
            return
        self.timeline.unloaded(name, sent=sent, done=done)

    async def _requests(self, size: Size, stop: asyncio.Event, outcomes: list, seed: int) -> None:
        rng = random.Random(seed)
        choices = [*self.world.names, None]  # None: the base model
        while not stop.is_set():
            adapter, prompt = rng.choice(choices), rng.randrange(len(PROMPTS))
            outcomes.append(await stream(self.client, PROMPTS, prompt, adapter, max_new_tokens=size.max_new_tokens))
