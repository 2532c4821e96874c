"""Bad bytes everywhere: what hostile or broken clients send, over raw sockets, against a live server.

Each probe must end in a 4xx or a clean close, within a bound: never a 5xx, never a connection left
hanging. Meanwhile the server must keep serving: slow clients holding connections do not delay a normal
request, and after every probe /health answers and a generation still works. Prints one line per probe
and exits 1 if any failed.

    python bench/bad_bytes.py --url http://127.0.0.1:8000 --slow-clients 200 --body-timeout 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

NUL, NOT_UTF8 = "\x00", b"\xff\xfe\xc0"
# Requests with every string field the routes read; a probe puts bad bytes in one field at a time.
# Prompt text may hold NUL (it is tokenized, as vLLM does): those answers must be a 200.
REQUESTS = [
    (
        "/generate",
        {
            "inputs": "hi",
            "adapter": "",
            "parameters": {"max_new_tokens": 2, "stop": ["zz"], "adapter_id": "", "api_token": "t"},
        },
    ),
    ("/generate", {"instruction": "say hi", "input": "x", "parameters": {"max_new_tokens": 2}}),
    ("/generate_stream", {"inputs": "hi", "parameters": {"max_new_tokens": 2, "stop": ["zz"]}}),
    ("/v1/completions", {"model": "{base}", "prompt": "hi", "max_tokens": 2, "stop": ["zz"], "user": "u"}),
    (
        "/v1/chat/completions",
        {"model": "{base}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": "zz"},
    ),
    ("/admin/adapters", {"name": "a", "path": "a"}),
]
PROMPT_FIELDS = {"inputs", "instruction", "input", "prompt", "content"}


@dataclass
class Outcome:
    status: int | None  # None: the server closed the connection without an answer
    seconds: float
    hung: bool = False  # neither an answer nor a close within the bound

    def __str__(self) -> str:
        what = "no answer, still open" if self.hung else ("closed" if self.status is None else str(self.status))
        return f"{what} after {self.seconds:.2f}s"


@dataclass
class Result:
    probe: str
    outcome: Outcome
    ok: bool
    note: str = ""


class Target:
    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname, parts.port or 80
        self.auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
        self.base = httpx.get(f"{url}/v1/models", headers=self.headers(), timeout=10).json()["data"][0]["id"]

    def headers(self) -> dict:
        return {"Authorization": self.auth.decode().split(": ", 1)[1].strip()} if self.auth else {}

    def head(self, path: str, extra: bytes = b"") -> bytes:
        return (
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + self.auth + extra
        )

    async def exchange(self, parts: list[bytes], *, bound: float, gap: float = 0.0, stream=None) -> Outcome:
        """Send `parts` (then `stream()`'s chunks, if given) with `gap` s between writes; the status of
        the answer, or a close, or `hung` when neither came within `bound` seconds."""
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        sender = asyncio.ensure_future(_send(writer, parts, gap, stream))
        try:
            line = await asyncio.wait_for(reader.readline(), bound)
            status = int(line.split()[1]) if line.startswith(b"HTTP/") else None
            return Outcome(status, time.monotonic() - started)
        except asyncio.TimeoutError:
            return Outcome(None, time.monotonic() - started, hung=True)
        except ConnectionError:
            return Outcome(None, time.monotonic() - started)
        finally:
            sender.cancel()
            writer.close()

    async def healthy(self) -> str:
        """'' when /health answers and a generation works, else what went wrong."""
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=30) as client:
            try:
                if (await client.get("/health", timeout=2)).status_code != 200:
                    return "/health did not answer 200"
                body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
                answer = await client.post("/generate", json=body)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__} {exc}"
        return "" if answer.status_code == 200 else f"/generate answered {answer.status_code}"


async def _send(writer, parts: list[bytes], gap: float, stream) -> None:
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(gap)
        if stream is not None:
            async for chunk in stream():
                writer.write(chunk)
                await writer.drain()
    except ConnectionError:
        pass  # the server closed: the reader sees it


def refused(outcome: Outcome) -> bool:
    """A 4xx, or a clean close; never a 5xx, a 2xx or a connection left hanging."""
    return not outcome.hung and (outcome.status is None or 400 <= outcome.status < 500)


# -- the probes ----------------------------------------------------------------------------------------------------


async def slow_headers(t: Target, *, clients: int, hold: float) -> list[Result]:
    """Slowloris: many connections dribbling header bytes. A normal request meanwhile must not wait."""
    dribble = [t.head("/generate")] + [b"X-Slow: 1\r\n"] * int(hold * 2)
    slow = [asyncio.ensure_future(t.exchange(dribble, bound=hold + 5, gap=0.5)) for _ in range(clients)]
    await asyncio.sleep(1)
    started = time.monotonic()
    problem = await t.healthy()
    served = Outcome(200 if not problem else None, time.monotonic() - started)
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    return [Result(f"normal request beside {clients} slowloris clients", served, not problem, problem)]


async def slow_body(t: Target, *, body_timeout: float) -> list[Result]:
    """A body that stops arriving, declared (Content-Length) or chunked: a 408 once the server's body
    timeout passes, or a close."""
    declared = [t.head("/generate", b"Content-Length: 1000\r\n\r\n"), b'{"inputs": "']
    chunked = [t.head("/generate", b"Transfer-Encoding: chunked\r\n\r\n"), b'5\r\n{"inp\r\n']
    out = []
    for name, parts in (("body that stops (Content-Length)", declared), ("chunked body that stops", chunked)):
        outcome = await t.exchange(parts, bound=body_timeout + 10)
        out.append(Result(name, outcome, refused(outcome)))
    return out


async def endless_body(t: Target) -> list[Result]:
    """A chunked body that never ends: 413 once it passes the limit, whatever comes after."""

    async def forever():
        chunk = b"a" * 65536
        while True:
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)

    outcome = await t.exchange([t.head("/generate", b"Transfer-Encoding: chunked\r\n\r\n")], bound=60, stream=forever)
    return [Result("chunked body that never ends", outcome, refused(outcome) and outcome.status in (413, None))]


async def header_floods(t: Target) -> list[Result]:
    """Headers past the server's limit are refused before the request runs: a valid body behind them
    shows whether they got through (a 200 means the server buffered them all)."""
    many = b"".join(b"X-Flood-%d: %s\r\n" % (i, b"a" * 100) for i in range(5000))  # 0.5 MB of headers
    huge = b"X-Huge: " + b"a" * 8_000_000 + b"\r\n"
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 1}}).encode()
    out = []
    for name, extra in (("5,000 headers (0.5 MB)", many), ("one 8 MB header", huge)):
        request = t.head("/generate", extra + b"Content-Length: %d\r\n\r\n" % len(body)) + body
        outcome = await t.exchange([request], bound=30)
        out.append(Result(name, outcome, refused(outcome) and outcome.status in (None, 400, 413, 431)))
    return out


async def bad_strings(t: Target) -> list[Result]:
    """NUL, and bytes that are not UTF-8, in every string field of every route's request."""
    out = []
    for path, template in REQUESTS:
        for field_path in _string_fields(template):
            for kind in ("NUL", "not UTF-8"):
                body = _with_bad_field(template, field_path, kind, t.base)
                outcome = await t.exchange([t.head(path, b"Content-Length: %d\r\n\r\n" % len(body)), body], bound=60)
                prompt_nul = kind == "NUL" and field_path[-1] in PROMPT_FIELDS
                ok = outcome.status == 200 if prompt_nul else refused(outcome) or outcome.status == 200
                name = f"{kind} in {path} {'.'.join(map(str, field_path))}"
                out.append(Result(name, outcome, ok, "prompt text may hold NUL" if prompt_nul else ""))
    return out


async def big_structures(t: Target) -> list[Result]:
    cases = {
        "100,000 stop strings": json.dumps({"inputs": "hi", "parameters": {"stop": ["a"] * 100_000}}).encode(),
        "a 900 kB stop string": json.dumps({"inputs": "hi", "parameters": {"stop": ["a" * 900_000]}}).encode(),
        "JSON nested 400,000 deep": b'{"inputs": "hi", "parameters": ' + b"[" * 400_000 + b"]" * 400_000 + b"}",
        "objects nested 100,000 deep": b'{"inputs": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    }
    out = []
    for name, body in cases.items():
        outcome = await t.exchange([t.head("/generate", b"Content-Length: %d\r\n\r\n" % len(body)), body], bound=60)
        out.append(Result(name, outcome, refused(outcome)))
    return out


def _string_fields(value, path=()) -> list[tuple]:
    if isinstance(value, str):
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, item in items for p in _string_fields(item, (*path, key))]


def _with_bad_field(template: dict, field_path: tuple, kind: str, base: str) -> bytes:
    """The request as JSON bytes, the field at `field_path` holding bad bytes in the middle of its text."""
    marker = "\u2603MARK\u2603"
    body = json.loads(json.dumps(template).replace("{base}", base))
    target = body
    for key in field_path[:-1]:
        target = target[key]
    target[field_path[-1]] = f"say{marker}hi"
    raw = json.dumps(body).encode()
    bad = json.dumps(NUL).encode()[1:-1] if kind == "NUL" else NOT_UTF8  # NUL as JSON must spell it \\u0000
    return raw.replace(json.dumps(marker).encode()[1:-1], bad)


# -- the run -------------------------------------------------------------------------------------------------------


async def run(url: str, *, token: str | None, slow_clients: int, body_timeout: float) -> list[Result]:
    t = Target(url, token)
    probes: list[Callable] = [
        lambda: slow_headers(t, clients=slow_clients, hold=6),
        lambda: slow_body(t, body_timeout=body_timeout),
        lambda: endless_body(t),
        lambda: header_floods(t),
        lambda: bad_strings(t),
        lambda: big_structures(t),
    ]
    results = []
    for probe in probes:
        batch = await probe()
        problem = await t.healthy()  # after each probe, the server must still serve
        if problem:
            batch.append(Result("healthy afterwards", Outcome(None, 0), False, problem))
        results += batch
    return results


def report(results: list[Result]) -> str:
    lines = [
        f"{'ok' if r.ok else 'FAIL':4} {r.probe}: {r.outcome}" + (f" ({r.note})" if r.note else "") for r in results
    ]
    failed = sum(not r.ok for r in results)
    return "\n".join([*lines, f"{len(results)} probes, {failed} failed"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", help="admin token (and API key, if the server has keys)")
    parser.add_argument("--slow-clients", type=int, default=200, help="slowloris connections held at once")
    parser.add_argument("--body-timeout", type=float, default=30.0, help="the server's LORASERVE_BODY_TIMEOUT_SECONDS")
    args = parser.parse_args()
    results = asyncio.run(
        run(args.url, token=args.token, slow_clients=args.slow_clients, body_timeout=args.body_timeout)
    )
    print(report(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
