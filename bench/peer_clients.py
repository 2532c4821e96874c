"""Peer clients under load: the clients users actually point at this server, at rising concurrency,
against both wire formats, counting every request that failed or came back short.

- vLLM's own benchmark client (`vllm bench serve`, as shipped: no patch), on /v1/completions and
  /v1/chat/completions, greedy and sampled, its random-token prompts (which hold NUL and other control
  characters). It runs in vLLM's own Python environment (--vllm-python), through bench/gpu/http_compare.py.
- the `openai` client: completions and chat, streamed and blocking, exactly --output-len tokens each
  (ignore_eos), so a lost chunk or a short answer counts as a failure.
- huggingface_hub's InferenceClient on the native route (/generate_stream and /generate), with details.

Adapters are taken round-robin with the base model. Prints a row per client, route and level; exits 1
on any failed request.

    python bench/peer_clients.py --url http://127.0.0.1:8000 --tokenizer MODEL_DIR --adapters facts-en \\
        --vllm-python VLLM_ENV/bin/python --levels 1,4,16,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
# Prompts as users and random-token benchmarks send them: Chinese, emoji, NUL and other control characters.
ALPHABET = list("abcdefghij klmnop qrstuvwxyz .,;!?\n\t") + list("鹪鹩港渡轮的图书馆") + ["🙂", "\x00", "\x07", "é"]


@dataclass
class Row:
    client: str
    route: str
    mode: str
    level: int
    requests: int
    failed: int
    seconds: float
    error: str = ""  # the first failure's reason

    def __str__(self) -> str:
        done = f"{self.requests - self.failed}/{self.requests}"
        line = f"{self.client:18} {self.route:22} {self.mode:9} c={self.level:<3} {done:>9} ok  {self.seconds:6.1f}s"
        return line + (f"  first failure: {self.error[:160]}" if self.error else "")


def prompt(rng: random.Random, chars: int = 48) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(chars))


async def closed_loop(level: int, requests: int, one: Callable[[int], Awaitable[str]]) -> tuple[int, str, float]:
    """`requests` calls of one(i) with `level` in flight; returns (failed, first error, seconds). one(i)
    returns '' when the answer was complete, else what was wrong with it."""
    queue = iter(range(requests))
    errors: list[str] = []

    async def worker():
        for i in queue:
            try:
                problem = await one(i)
            except Exception as exc:  # the client raised: the request failed
                problem = f"{type(exc).__name__}: {exc}"
            if problem:
                errors.append(problem)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(level)))
    return len(errors), errors[0] if errors else "", time.monotonic() - started


# -- the openai client ---------------------------------------------------------------------------------------------


def openai_request(client, models: list[str], *, route: str, stream: bool, output_len: int, seed: int):
    """one(i) for closed_loop: request i, greedy, exactly output_len tokens; '' when that is what came."""
    rng = random.Random(seed)
    prompts = [prompt(rng) for _ in range(256)]

    async def one(i: int) -> str:
        common = dict(model=models[i % len(models)], max_tokens=output_len, temperature=0, stream=stream)
        common["extra_body"] = {"ignore_eos": True}
        if stream:
            common["stream_options"] = {"include_usage": True}
        text = prompts[i % len(prompts)]
        if route == "chat":
            answer = await client.chat.completions.create(messages=[{"role": "user", "content": text}], **common)
        else:
            answer = await client.completions.create(prompt=text, **common)
        if not stream:
            return _short(answer.usage.completion_tokens, output_len, answer.choices[0].finish_reason)
        finish = tokens = None
        async for chunk in answer:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return _short(tokens, output_len, finish)

    return one


def _short(tokens: int | None, wanted: int, finish: str | None) -> str:
    if finish != "length" or tokens != wanted:
        return f"{tokens} tokens, finish_reason {finish!r} (wanted {wanted}, 'length')"
    return ""


async def openai_rows(url: str, models: list[str], levels: list[int], *, output_len: int) -> list[Row]:
    from openai import AsyncOpenAI

    rows = []
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        for route, path in (("completions", "/v1/completions"), ("chat", "/v1/chat/completions")):
            for stream in (True, False):
                for level in levels:
                    requests = max(2 * level, 8)
                    one = openai_request(client, models, route=route, stream=stream, output_len=output_len, seed=level)
                    failed, error, seconds = await closed_loop(level, requests, one)
                    mode = "stream" if stream else "blocking"
                    rows.append(Row("openai", path, mode, level, requests, failed, seconds, error))
    return rows


# -- huggingface_hub -----------------------------------------------------------------------------------------------


def hf_request(client, adapters: list[str | None], *, stream: bool, output_len: int, seed: int):
    rng = random.Random(seed)
    prompts = [prompt(rng) for _ in range(256)]

    async def one(i: int) -> str:
        adapter = adapters[i % len(adapters)]
        text = prompts[i % len(prompts)]
        answer = await client.text_generation(
            text, max_new_tokens=output_len, details=True, stream=stream, adapter_id=adapter
        )
        if not stream:
            return "" if answer.details and answer.details.finish_reason else f"no details: {answer!r:.120}"
        last = None
        async for event in answer:
            last = event
        return "" if last is not None and last.details and last.details.finish_reason else f"last event {last!r:.120}"

    return one


async def hf_rows(url: str, adapters: list[str | None], levels: list[int], *, output_len: int) -> list[Row]:
    from huggingface_hub import AsyncInferenceClient

    rows = []
    client = AsyncInferenceClient(base_url=url, timeout=120)
    for stream, path in ((True, "/generate_stream"), (False, "/generate")):
        for level in levels:
            requests = max(2 * level, 8)
            one = hf_request(client, adapters, stream=stream, output_len=output_len, seed=level)
            failed, error, seconds = await closed_loop(level, requests, one)
            rows.append(
                Row(
                    "huggingface_hub", path, "stream" if stream else "blocking", level, requests, failed, seconds, error
                )
            )
    await client.close()
    return rows


# -- vLLM's benchmark client -------------------------------------------------------------------------------------


def vllm_rows(args, base: str, adapters: list[str], levels: list[int]) -> list[Row]:
    """`vllm bench serve` as shipped (http_compare.py --raw-client), in vLLM's own environment."""
    with tempfile.TemporaryDirectory(prefix="peer-vllm-") as out:
        command = [args.vllm_python, str(REPO / "bench" / "gpu" / "http_compare.py"), "bench-serve", "--raw-client"]
        command += ["--label", "ours", "--base-url", args.url, "--tokenizer", str(args.tokenizer), "--model", base]
        command += ["--lora-modules", ",".join(adapters), "--levels", ",".join(map(str, levels))]
        command += ["--input-len", str(args.input_len), "--output-len", str(args.output_len), "--out", out]
        command += ["--prompts-per-stream", "2", "--min-prompts", "8", "--run-timeout", "300"]
        proc = subprocess.run(command, capture_output=True, text=True)
        summary = Path(out) / "bench_serve_ours.json"
        if not summary.is_file():
            return [Row("vllm bench serve", "-", "-", 0, 1, 1, 0, f"exit {proc.returncode}: {proc.stderr[-600:]}")]
        return [_vllm_row(run) for run in json.loads(summary.read_text())["runs"]]


def _vllm_row(run: dict) -> Row:
    result = run.get("result") or {}
    completed, failed = result.get("completed") or 0, result.get("failed") or 0
    if run["status"] != "ok":  # the run itself did not finish: every request of it counts as failed
        completed, failed = 0, run["num_prompts"]
    path = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}[run["route"]]
    error = run.get("why", "") if run["status"] != "ok" else ""
    return Row(
        "vllm bench serve", path, run["sampling"], run["level"], completed + failed, failed, run["wall_s"], error
    )


# -- the run -------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--tokenizer", type=Path, required=True, help="the served model's dir (vLLM's client reads it)")
    parser.add_argument("--adapters", default="", help="adapter names, comma-separated (round-robin with the base)")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--input-len", type=int, default=32, help="vLLM's random prompts, in tokens")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--vllm-python", help="python of an environment with vllm installed; none: skip that client")
    parser.add_argument("--clients", default="vllm,openai,hf")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    adapters = [a for a in args.adapters.split(",") if a]
    base = httpx.get(f"{args.url}/v1/models", timeout=10).json()["data"][0]["id"]
    clients = args.clients.split(",")
    rows: list[Row] = []
    if "vllm" in clients and args.vllm_python:
        rows += vllm_rows(args, base, adapters, levels)
    if "openai" in clients:
        rows += asyncio.run(openai_rows(args.url, [base, *adapters], levels, output_len=args.output_len))
    if "hf" in clients:
        rows += asyncio.run(hf_rows(args.url, [None, *adapters], levels, output_len=args.output_len))
    for row in rows:
        print(row)
    failed = sum(r.failed for r in rows)
    print(f"{sum(r.requests for r in rows)} requests, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
