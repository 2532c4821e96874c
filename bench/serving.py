"""Serving load generator for loraserve's /generate_stream (the method of vLLM's benchmark_serving).

Closed loop (--concurrency 1,2,4,8): N workers, each sending its next request as soon as its last one
finished, --requests per level (at least --requests-per-stream times the level; or for --duration s).
Open loop (--rates 1,2,4): Poisson arrivals at that many req/s. Each request is a raw prompt of
~--input-len tokens (random words, scaled by one calibration request) with the output length as its
maximum and ignore_eos, so every request generates exactly that many tokens; the actual generated tokens
and any finish_reason other than "length" are still recorded and reported.
Greedy by default; --sampled: temperature 1, top_p 0.95 and a seed per request (its index).
--route: native (/generate_stream, TGI events), or the OpenAI routes completions (/v1/completions) and chat
(/v1/chat/completions), streamed with usage; there a chunk carrying text counts as a token for TTFT and ITL,
and the token count comes from usage.
Prints a table per mode (a row per level); --json writes everything, per request, with machine info
(after every level, so a run cut short keeps the levels it finished).

    python bench/serving.py --url http://127.0.0.1:8000 --adapters facts-en,facts-zh \
        --concurrency 1,2,4,8 --requests 16 --input-len 64 --output-len 32 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.stats import percentile  # noqa: E402
from loraserve import __version__ as loraserve_version  # noqa: E402

TEMPERATURE, TOP_P = 1.0, 0.95  # --sampled, as the engine benchmark's sampled scenarios
ROUTES = {"native": "/generate_stream", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
WORDS = (
    "the quick brown fox jumps over lazy dog river castle tower answer question capital city "
    "world hello poem wrote number color red blue green apple"
).split()


@dataclass
class Request:
    adapter: str | None
    prompt: str
    output_len: int
    seed: int = 0  # used when sampling


@dataclass(frozen=True)
class Target:
    """Where requests go and how they ask: the server, the route, greedy or sampled."""

    url: str
    route: str = "native"
    sampled: bool = False
    base_model: str | None = None  # the OpenAI routes' name of the base model

    def body(self, req: Request) -> dict:
        sampling = {"temperature": TEMPERATURE, "top_p": TOP_P, "seed": req.seed} if self.sampled else {}
        if self.route == "native":
            parameters = {
                "adapter_id": req.adapter,
                "max_new_tokens": req.output_len,
                "ignore_eos": True,
                **sampling,
                **({"do_sample": True} if self.sampled else {}),
            }
            return {"inputs": req.prompt, "parameters": parameters}
        body = {
            "model": req.adapter or self.base_model,
            "max_tokens": req.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            **(sampling or {"temperature": 0}),
        }  # OpenAI's default temperature (1) samples
        if self.route == "chat":
            return {**body, "messages": [{"role": "user", "content": req.prompt}]}
        return {**body, "prompt": req.prompt}


@dataclass
class Result:
    adapter: str | None
    output_len: int
    ok: bool = False
    error: str | None = None  # "http 429", "inband", "ReadTimeout", ...
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0  # token events seen
    generated_tokens: int | None = None  # from the final details
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    itl: list[float] = field(default_factory=list)


def numbers(cast):
    return lambda text: [cast(x) for x in text.split(",") if x.strip()]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def request_factory(args, rng: random.Random, tokens_per_word: float):
    """A seeded stream of requests: adapter (uniform or Zipf over the list), prompt and output lengths."""
    names = [None if n.strip() in ("", "base") else n.strip() for n in args.adapters.split(",")]
    zipf_s = args.zipf_s if args.adapter_dist == "zipf" else 0.0
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(names))]

    def length(fixed: int, spec: str | None) -> int:
        low, high = (int(x) for x in spec.split(":")) if spec else (fixed, fixed)
        return rng.randint(low, high)

    counter = itertools.count()

    def next_request() -> Request:
        index = next(counter)
        adapter = names[index % len(names)] if args.adapter_dist == "round-robin" else rng.choices(names, weights)[0]
        return Request(
            adapter,
            words(rng, round(length(args.input_len, args.input_len_range) / tokens_per_word)),
            length(args.output_len, args.output_len_range),
            seed=index,
        )

    return next_request


async def tokens_per_word(client, target: Target, rng: random.Random, probe: int = 200) -> float:
    """The server's tokenizer is unknown here: one 1-token request reports how many tokens a word costs
    (on the chat route, its template's tokens too)."""
    res = await send(client, target, Request(None, words(rng, probe), 1))
    if not res.prompt_tokens:  # a 1-token answer may be no text at all: only its prompt count matters here
        raise SystemExit(f"calibration request failed: {res.error}")
    return res.prompt_tokens / probe


async def send(client: httpx.AsyncClient, target: Target, req: Request) -> Result:
    res = Result(req.adapter, req.output_len)
    read = read_native if target.route == "native" else read_openai
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", target.url + ROUTES[target.route], json=target.body(req)) as resp:
            if resp.status_code != 200:
                await resp.aread()
                res.error = f"http {resp.status_code}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue  # blank separators, ": ping" comments, the OpenAI routes' end
                event, now = json.loads(line[5:]), time.perf_counter()
                if "error" in event:
                    res.error = "inband"
                    return res
                if read(event, res):
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last, res.tokens = now, res.tokens + 1
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft is not None and res.finish_reason is not None
        res.error = None if res.ok else "no text" if res.finish_reason else "incomplete stream"
    except (httpx.HTTPError, ValueError) as exc:  # connection trouble, a malformed event
        res.error = type(exc).__name__
    return res


def read_native(event: dict, res: Result) -> bool:
    """Notes what a /generate_stream event tells; True when it carries a token."""
    if event.get("details"):
        details = event["details"]
        res.generated_tokens, res.prompt_tokens, res.finish_reason = (
            details.get(k) for k in ("generated_tokens", "prompt_tokens", "finish_reason")
        )
    return event.get("token") is not None


def read_openai(event: dict, res: Result) -> bool:
    """Notes what an OpenAI stream chunk tells; True when it carries text (a chat's opening role chunk,
    the closing chunk and the usage chunk do not)."""
    if event.get("usage"):
        res.generated_tokens, res.prompt_tokens = (
            event["usage"].get("completion_tokens"),
            event["usage"].get("prompt_tokens"),
        )
    text = False
    for choice in event.get("choices") or []:
        res.finish_reason = choice.get("finish_reason") or res.finish_reason
        text = text or bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
    return text


async def closed_loop(
    client, target: Target, next_request, concurrency: int, total: int | None, duration: float | None
):
    results: list[Result] = []
    deadline = time.perf_counter() + duration if duration else None
    issued = 0

    async def worker():
        nonlocal issued
        while (total is None or issued < total) and (deadline is None or time.perf_counter() < deadline):
            issued += 1
            results.append(await send(client, target, next_request()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def open_loop(
    client, target: Target, next_request, rate: float, total: int | None, duration: float | None, rng: random.Random
):
    tasks, start = [], time.perf_counter()
    while total is None or len(tasks) < total:
        await asyncio.sleep(rng.expovariate(rate))
        if duration and time.perf_counter() - start >= duration:
            break
        tasks.append(asyncio.create_task(send(client, target, next_request())))
    return list(await asyncio.gather(*tasks))


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    ms = [v * 1000 for v in values]
    return {"mean": sum(ms) / len(ms), **{f"p{q}": percentile(ms, q) for q in (50, 90, 99)}}


def summarize(mode: str, level, results: list[Result], wall: float) -> dict:
    done = [r for r in results if r.ok]
    tokens = sum(r.generated_tokens or r.tokens for r in done)
    return {
        "mode": mode,
        "level": level,
        "requested": len(results),
        "completed": len(done),
        "errors": dict(Counter(r.error for r in results if not r.ok)),
        "duration_s": wall,
        "request_throughput": len(done) / wall,
        "output_throughput": tokens / wall,
        "total_output_tokens": tokens,
        "not_length": dict(Counter(r.finish_reason for r in done if r.finish_reason != "length")),
        "short_outputs": sum(1 for r in done if (r.generated_tokens or 0) != r.output_len),
        "mean_prompt_tokens": sum(r.prompt_tokens or 0 for r in done) / len(done) if done else None,
        "adapters": dict(Counter(str(r.adapter) for r in results)),
        "ttft_ms": stats([r.ttft for r in done]),
        "tpot_ms": stats([(r.e2e - r.ttft) / (n - 1) for r in done if (n := r.generated_tokens or r.tokens) > 1]),
        "itl_ms": stats([gap for r in done for gap in r.itl]),
        "e2e_ms": stats([r.e2e for r in done]),
        "requests": [{k: v for k, v in asdict(r).items() if k != "itl"} for r in results],
    }


async def run_level(client, args, target: Target, mode: str, level, next_request, rng) -> dict:
    duration, total = args.duration, None if args.duration else args.requests
    started, cpu = time.perf_counter(), time.process_time()
    if mode == "concurrency":
        total = total and max(total, args.requests_per_stream * int(level))
        results = await closed_loop(client, target, next_request, int(level), total, duration)
    else:
        results = await open_loop(client, target, next_request, float(level), total, duration, rng)
    summary = summarize(mode, level, results, time.perf_counter() - started)
    summary["client_cpu_s"] = time.process_time() - cpu  # this load generator shares the CPU with a local server
    return summary


def machine_info(url: str) -> dict:
    try:
        server = httpx.get(f"{url}/info", timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        server = {"error": repr(exc)}
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "loraserve_version": loraserve_version,
        "server_info": server,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


HEADER = [
    "mode",
    "level",
    "done",
    "err",
    "req/s",
    "tok/s",
    "ttft p50",
    "ttft p99",
    "tpot p50",
    "itl p99",
    "e2e p50",
    "e2e p99",
    "!len",
]
TIMES = [
    ("ttft_ms", "p50"),
    ("ttft_ms", "p99"),
    ("tpot_ms", "p50"),
    ("itl_ms", "p99"),
    ("e2e_ms", "p50"),
    ("e2e_ms", "p99"),
]


def print_table(levels: list[dict]) -> None:
    def line(cells: list) -> None:
        print(f"{cells[0]:<12}" + "".join(f"{cell:>9}" for cell in cells[1:]))

    line(HEADER)
    for s in levels:
        times = [f"{s[metric][q]:.1f}" if s[metric] else "-" for metric, q in TIMES]
        line(
            [
                s["mode"],
                s["level"],
                s["completed"],
                sum(s["errors"].values()),
                f"{s['request_throughput']:.2f}",
                f"{s['output_throughput']:.1f}",
                *times,
                sum(s["not_length"].values()),
            ]
        )
        if s["errors"]:
            print(f"{'':<12}errors: {s['errors']}")


async def bench(args) -> dict:
    rng = random.Random(args.seed)
    modes = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.rates]
    keepalive = max(args.concurrency + [64])
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=keepalive)
    timeout = httpx.Timeout(args.timeout, connect=10)
    out = {"machine": machine_info(args.url), "args": vars(args), "levels": []}
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        base = args.model_name if args.route == "native" else args.model_name or await base_model_name(client, args.url)
        target = Target(args.url, route=args.route, sampled=args.sampled, base_model=base)
        out["tokens_per_word"] = ratio = await tokens_per_word(client, target, rng)
        next_request = request_factory(args, rng, ratio)
        if args.warmup:
            warm = await closed_loop(client, target, next_request, min(args.warmup, keepalive), args.warmup, None)
            out["warmup_errors"] = dict(Counter(r.error for r in warm if not r.ok))
        for mode, level in modes:
            summary = await run_level(client, args, target, mode, level, next_request, rng)
            out["levels"].append(summary)
            if args.json:
                write_json(out, args.json)
            print(
                f"  {mode}={level}: {summary['completed']}/{summary['requested']} done, "
                f"{summary['output_throughput']:.1f} tok/s",
                file=sys.stderr,
            )
    return out


async def base_model_name(client: httpx.AsyncClient, url: str) -> str:
    """The OpenAI routes' id of the base model: the model GET /v1/models lists without a parent."""
    models = (await client.get(f"{url}/v1/models")).json()["data"]
    return next((m["id"] for m in models if not m.get("parent")), models[0]["id"])


def write_json(out: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--adapters", default="base", help="comma-separated names; 'base' or empty = the base model")
    p.add_argument("--adapter-dist", choices=["uniform", "zipf", "round-robin"], default="uniform")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--concurrency", type=numbers(int), default=[], help="closed-loop levels, e.g. 1,2,4,8")
    p.add_argument("--rates", type=numbers(float), default=[], help="open-loop Poisson rates (req/s), e.g. 1,2,4")
    p.add_argument("--requests", type=int, default=32, help="requests per level")
    p.add_argument(
        "--requests-per-stream",
        type=int,
        default=0,
        help="closed loop: at least this many requests per concurrent stream (e.g. 2: 2 x level)",
    )
    p.add_argument(
        "--route",
        choices=list(ROUTES),
        default="native",
        help="native /generate_stream, or the OpenAI routes /v1/completions, /v1/chat/completions",
    )
    p.add_argument(
        "--sampled", action="store_true", help="temperature 1, top_p 0.95, a seed per request; default greedy"
    )
    p.add_argument("--model-name", help="OpenAI routes: the base model's id (default: from GET /v1/models)")
    p.add_argument("--duration", type=float, default=None, help="seconds per level (instead of --requests)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens (approx.)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--input-len-range", help="a:b, sampled uniformly (overrides --input-len)")
    p.add_argument("--output-len-range", help="a:b, sampled uniformly (overrides --output-len)")
    p.add_argument("--warmup", type=int, default=2, help="requests sent before the first level, not measured")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request read timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the full results here")
    args = p.parse_args(argv)
    if not args.concurrency and not args.rates:
        p.error("give --concurrency and/or --rates")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.url = args.url.rstrip("/")
    out = asyncio.run(bench(args))
    for mode, title in (("concurrency", "closed loop (concurrency)"), ("rate", "open loop (Poisson req/s)")):
        levels = [s for s in out["levels"] if s["mode"] == mode]
        if levels:
            print(
                f"\n{title}: {args.route} route, {'sampled' if args.sampled else 'greedy'}, {args.adapters} "
                f"({args.adapter_dist}), in ~{args.input_len_range or args.input_len} out "
                f"{args.output_len_range or args.output_len}; times in ms; !len: finish_reason != length"
            )
            print_table(levels)
    if args.json:
        write_json(out, args.json)
        print(f"wrote {args.json}")
    return 0 if any(s["completed"] for s in out["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
