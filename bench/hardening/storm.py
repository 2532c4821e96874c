"""Disconnect storm: streaming clients killed at random points, over raw sockets.

Each client sends a long streamed generation (native or OpenAI route, an adapter or the base model)
and is killed after a random delay: some while queued or before the first byte, most mid-stream; half
with a reset (SO_LINGER 0, as a killed process's socket), half with a plain close. Must hold: 2 s after
the last kill no generation runs, every KV slot and adapter slot pin is back, nothing waits in the
queue, and the next requests answer exactly their own texts.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from bench.hardening.client import TIMEOUT, scrape, stream
from bench.hardening.report import Report, ms
from bench.hardening.versions import Timeline, expected_texts, judge
from bench.hardening.world import PROMPTS, World

IDLE = ("loraserve_running_generations", "loraserve_kv_slots_used", "loraserve_adapter_slots_pinned")


@dataclass(frozen=True)
class Size:
    clients: int = 100
    kill_within: float = 3.0  # seconds after its request each client is killed, at most
    settle: float = 2.0


QUICK, FULL = Size(clients=40, kill_within=2.0), Size()


def run(world: World, size: Size = QUICK) -> Report:
    # Room for every client at once (no 429s: this is about disconnects, overload is its own scenario).
    server = world.serve(preload=world.names, label="storm", max_queue=size.clients)
    try:
        return asyncio.run(_run(world, server, size))
    finally:
        server.stop()


async def _run(world: World, server, size: Size) -> Report:
    async with httpx.AsyncClient(base_url=server.url, timeout=TIMEOUT) as client:
        texts = await expected_texts(client, world, server.admin_token, max_new_tokens=16, live=world.names, paths=[])
        model = (await client.get("/info")).json()["model_id"]
        rng = random.Random(13)
        host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
        kills = await asyncio.gather(
            *(
                _doomed(host, port, _request(rng, world, model), _kill_time(rng, size), rng.random() < 0.5)
                for _ in range(size.clients)
            )
        )
        last_kill = time.monotonic()
        drained_after = await _time_to_idle(client, size.settle)
        await asyncio.sleep(max(0.0, last_kill + size.settle - time.monotonic()))
        after = await scrape(client)
        timeline = Timeline()
        for name in world.names:
            timeline.preloaded(name, (await client.get(f"/adapters/{name}")).json()["version"])
        nexts = await asyncio.gather(
            *(
                stream(client, PROMPTS, i % len(PROMPTS), name, max_new_tokens=16)
                for i, name in enumerate([*world.names, None] * 2)
            )
        )
    report = Report("storm")
    report.failures += world.log_problems(server)
    for name in (*IDLE, "loraserve_queue_depth"):
        report.check(after[name] == 0, f"{name} is {after[name]:.0f} {size.settle:.0f} s after the last kill")
    for out in nexts:
        failure = judge(out, texts, timeline)
        report.check(failure is None, f"after the storm: {failure}")
    before_bytes = sum(k == 0 for k in kills)
    report.figures = {
        "clients killed": size.clients,
        "killed before the first byte / mid-stream": f"{before_bytes} / {size.clients - before_bytes}",
        "bytes read before the kill, median": sorted(kills)[len(kills) // 2],
        "seconds from the last kill to no generation": None if drained_after is None else round(drained_after, 2),
        "running / KV slots / adapter pins 2 s later": " / ".join(f"{after[n]:.0f}" for n in IDLE),
        "next requests exact": f"{sum(judge(o, texts, timeline) is None for o in nexts)} / {len(nexts)}",
        "next requests TTFT p50 ms": ms([o.ttft for o in nexts if o.ttft is not None], 50),
    }
    return report


def _kill_time(rng: random.Random, size: Size) -> float:
    """A third die at once (queued, or before any byte came back), the rest anywhere in their stream."""
    return rng.uniform(0, 0.05) if rng.random() < 1 / 3 else rng.uniform(0, size.kill_within)


def _request(rng: random.Random, world: World, model: str) -> tuple[str, dict]:
    adapter = rng.choice([*world.names, None])
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        parameters = {"max_new_tokens": 400, "ignore_eos": True}
        return "/generate_stream", {
            "inputs": prompt,
            "parameters": parameters,
            **({"adapter": adapter} if adapter else {}),
        }
    return "/v1/completions", {
        "model": adapter or model,
        "prompt": prompt,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }


async def _doomed(host: str, port: int, request: tuple[str, dict], after: float, reset: bool) -> int:
    """Send the request, read whatever comes for `after` seconds, then die; returns the bytes read."""
    path, payload = request
    body = json.dumps(payload).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.encode() + body)
    got = 0
    deadline = time.monotonic() + after
    try:
        while (left := deadline - time.monotonic()) > 0:
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                break
            got += len(chunk)
    except asyncio.TimeoutError:
        pass
    if reset:  # an RST, as the kernel sends for a killed process's socket with unread data
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return got


async def _time_to_idle(client: httpx.AsyncClient, limit: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        numbers = await scrape(client)
        if all(numbers[name] == 0 for name in IDLE):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    return None
