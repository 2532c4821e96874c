"""Helpers of bench/gpu/run_http_compare.sh (standard library only: it runs in vLLM's environment too).

    python3 bench/gpu/http_compare.py bench-serve --label ours --base-url http://127.0.0.1:8011 \\
        --tokenizer DIR --lora-modules a0,...,a7 --out OUT [--deadline EPOCH]
    python3 bench/gpu/http_compare.py table OUT

bench-serve runs vLLM's own client (`vllm bench serve`, as ../shared/gpu/vllm/README.md gives it) once per
route (/v1/completions, /v1/chat/completions), sampling (greedy: temperature 0; sampled: temperature 1,
top_p 0.95) and concurrency, --prompts-per-stream x concurrency prompts (at least --min-prompts): in this
one process, as its CLI does (add_cli_args, then main), so vLLM is imported once rather than per run.
Each run is bounded (--run-timeout), and none starts past --deadline: those are recorded as skipped.
Every run's own result file lands in OUT, and OUT/bench_serve_LABEL.json lists them all.

table prints the comparison from OUT: start-up times (startup_NAME.json), bench/serving.py on the native route
(native_greedy.json, native_sampled.json) and the bench-serve runs of each server, with ours / vLLM ratios;
and writes OUT/summary.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ENDPOINTS = {"completions": ("openai", "/v1/completions"), "chat": ("openai-chat", "/v1/chat/completions")}
SAMPLING = {"greedy": ["--temperature", "0"], "sampled": ["--temperature", "1.0", "--top-p", "0.95"]}
KEPT = (
    "completed",
    "failed",
    "total_output_tokens",
    "duration",
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "median_itl_ms",
    "median_e2el_ms",
)


def numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# -- bench-serve ----------------------------------------------------------------------------------------------
def client_argv(args, *, endpoint: str, sampling: str, level: int, prompts: int, filename: str) -> list[str]:
    backend, path = ENDPOINTS[endpoint]
    return [
        "--backend",
        backend,
        "--base-url",
        args.base_url,
        "--endpoint",
        path,
        "--model",
        args.model,
        "--tokenizer",
        args.tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--ignore-eos",
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(level),
        "--lora-modules",
        *names(args.lora_modules),
        "--lora-assignment",
        "round-robin",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--disable-tqdm",
        "--save-result",
        "--result-dir",
        args.out,
        "--result-filename",
        filename,
        *SAMPLING[sampling],
    ]


class RunTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM raises in the main thread, inside the client's event loop; asyncio.run then cancels its tasks."""

    def expire(signum, frame):
        raise RunTimeout(f"over {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def accept_crlf_events() -> bool:
    """Let vLLM's client read events that end in CRLF, as the SSE spec allows and sse-starlette (our server)
    sends: it splits events on "\n\n" only, so where two events arrive in one read it parses neither and
    loses them (tokens, the usage chunk; requests then count as failed or short). Patched in this process
    only; vLLM's server ends events in LF, on which this changes nothing."""
    try:
        from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler
    except ImportError:
        return False
    add_chunk = StreamedResponseHandler.add_chunk

    def add_chunk_crlf(self, chunk_bytes: bytes) -> list[str]:
        return add_chunk(self, chunk_bytes.replace(b"\r\n", b"\n"))

    StreamedResponseHandler.add_chunk = add_chunk_crlf
    return True


def in_process_client(*, crlf: bool):
    """vLLM's `bench serve` as its CLI runs it, or None where this vLLM lays it out otherwise."""
    try:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError as exc:
        print(f"bench serve: in-process client unavailable ({exc}); one CLI process per run", file=sys.stderr)
        return None
    if crlf and not accept_crlf_events():
        print(
            "bench serve: could not let the client read CRLF events; runs against ours may lose events", file=sys.stderr
        )

    def run(argv: list[str], timeout: float) -> None:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        with time_limit(timeout):
            main(parser.parse_args(argv))

    return run


def cli_client(argv: list[str], timeout: float) -> None:
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", *argv]
    try:
        subprocess.run(command, check=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RunTimeout(f"over {timeout:.0f}s") from exc


def bench_serve(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    client = in_process_client(crlf=not args.raw_client) or cli_client
    summary_path, runs = out / f"bench_serve_{args.label}.json", []
    patched = client is not cli_client and not args.raw_client
    for endpoint in names(args.endpoints):
        for sampling in names(args.sampling):
            for level in numbers(args.levels):
                prompts = max(args.prompts_per_stream * level, args.min_prompts)
                filename = f"bench_serve_{args.label}_{endpoint}_{sampling}_c{level}.json"
                run = {
                    "server": args.label,
                    "route": endpoint,
                    "sampling": sampling,
                    "level": level,
                    "num_prompts": prompts,
                    "file": filename,
                    "client_reads_crlf": patched,
                }
                left = args.deadline - time.time() if args.deadline else float("inf")
                if left < args.min_left:
                    runs.append({**run, "status": "skipped", "why": f"{max(left, 0):.0f}s left of the budget"})
                    print(f"bench serve {args.label} {endpoint} {sampling} c={level}: skipped (time)", file=sys.stderr)
                    continue
                started = time.time()
                try:
                    client(
                        client_argv(
                            args, endpoint=endpoint, sampling=sampling, level=level, prompts=prompts, filename=filename
                        ),
                        min(args.run_timeout, left),
                    )
                    result = json.loads((out / filename).read_text())
                    run.update(status="ok", result={k: result.get(k) for k in KEPT})
                except RunTimeout as exc:
                    run.update(status="timeout", why=str(exc))
                except Exception as exc:  # a failed run is recorded; the next one still runs
                    run.update(status="error", why=f"{type(exc).__name__}: {exc}")
                run["wall_s"] = time.time() - started
                runs.append(run)
                summary_path.write_text(json.dumps({"runs": runs}, indent=1))
                shown = run.get("result") or {}
                print(
                    f"bench serve {args.label} {endpoint} {sampling} c={level}: {run['status']} "
                    f"{shown.get('output_throughput') or 0:.1f} tok/s in {run['wall_s']:.0f}s",
                    file=sys.stderr,
                )
    summary_path.write_text(json.dumps({"runs": runs}, indent=1))
    return 0 if any(r["status"] == "ok" for r in runs) else 1


# -- table ----------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def native_rows(out: Path) -> list[dict]:
    """bench/serving.py's closed-loop levels as rows of the table."""
    rows = []
    for sampling in SAMPLING:
        data = read_json(out / f"native_{sampling}.json")
        if data is None:
            continue
        cells = {
            s["level"]: {
                "tok_s": s["output_throughput"],
                "ttft_ms": (s["ttft_ms"] or {}).get("p50"),
                "done": f"{s['completed']}/{s['requested']}",
            }
            for s in data["levels"]
            if s["mode"] == "concurrency"
        }
        rows.append({"server": "ours", "client": "serving.py", "route": "native", "sampling": sampling, "cells": cells})
    return rows


def bench_serve_rows(out: Path) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for label in ("ours", "vllm"):
        for run in (read_json(out / f"bench_serve_{label}.json") or {}).get("runs", []):
            key = (label, run["route"], run["sampling"])
            row = rows.setdefault(
                key,
                {
                    "server": label,
                    "client": "bench serve",
                    "route": run["route"],
                    "sampling": run["sampling"],
                    "cells": {},
                },
            )
            result = run.get("result") or {}
            row["cells"][run["level"]] = {
                "tok_s": result.get("output_throughput"),
                "ttft_ms": result.get("median_ttft_ms"),
                "status": run["status"],
                "done": f"{result.get('completed')}/{run['num_prompts']}",
            }
    return list(rows.values())


def cell_text(cell: dict | None) -> str:
    if not cell:
        return "-"
    if cell.get("tok_s") is None:
        return cell.get("status", "-")
    ttft = cell.get("ttft_ms")
    return f"{cell['tok_s']:.0f} ({ttft:.0f})" if ttft is not None else f"{cell['tok_s']:.0f}"


def ratio(row: dict, other: dict, level: int) -> float | None:
    ours, theirs = ((r["cells"].get(level) or {}).get("tok_s") for r in (row, other))
    return ours / theirs if ours and theirs else None


def table(args) -> int:
    out = Path(args.out)
    rows = native_rows(out) + bench_serve_rows(out)
    startup = {path.stem.removeprefix("startup_"): read_json(path) for path in sorted(out.glob("startup_*.json"))}
    levels = sorted({level for row in rows for level in row["cells"]})
    print(
        "\nHTTP, both servers on the same files, adapters round-robin, lengths forced (ignore_eos): output tok/s "
        "(TTFT p50 ms) per concurrency; sampled = temperature 1, top_p 0.95"
    )
    print(f"{'server':<7}{'client':<13}{'route':<13}{'sampling':<9}" + "".join(f"{'c=' + str(c):>14}" for c in levels))
    for row in rows:
        print(
            f"{row['server']:<7}{row['client']:<13}{row['route']:<13}{row['sampling']:<9}"
            + "".join(f"{cell_text(row['cells'].get(c)):>14}" for c in levels)
        )
    ratios = []
    for row in rows:
        theirs = next(
            (
                r
                for r in rows
                if r["server"] == "vllm" and r["route"] == row["route"] and r["sampling"] == row["sampling"]
            ),
            None,
        )
        if row["server"] == "ours" and row["client"] == "bench serve" and theirs:
            ratios.append((row["route"], row["sampling"], {c: ratio(row, theirs, c) for c in levels}))
    if ratios:
        print("ours / vLLM output tok/s, same client (bench serve), same files")
        for route, sampling, cells in ratios:
            print(
                f"{'':<20}{route:<13}{sampling:<9}"
                + "".join(f"{('-' if cells[c] is None else format(cells[c], '.2f')):>14}" for c in levels)
            )
    if startup:
        print(
            "start-up, process start to ready: "
            + ", ".join(
                f"{name} {value:.0f}s" if isinstance(value, (int, float)) else f"{name} {value}"
                for name, value in startup.items()
            )
        )
    (out / "summary.json").write_text(json.dumps({"startup_s": startup, "rows": rows}, indent=1))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench-serve")
    b.add_argument("--label", required=True, help="ours or vllm: names the files")
    b.add_argument("--base-url", required=True)
    b.add_argument("--tokenizer", required=True, help="the model dir")
    b.add_argument("--model", default="base", help="the base model's served name")
    b.add_argument("--lora-modules", default=",".join(f"a{i}" for i in range(8)))
    b.add_argument("--endpoints", default=",".join(ENDPOINTS))
    b.add_argument("--sampling", default=",".join(SAMPLING))
    b.add_argument("--levels", default="1,8,32,64")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--prompts-per-stream", type=int, default=2)
    b.add_argument("--min-prompts", type=int, default=8)
    b.add_argument("--run-timeout", type=float, default=120.0, help="seconds one run may take")
    b.add_argument("--deadline", type=float, default=0.0, help="epoch seconds after which no run starts")
    b.add_argument("--min-left", type=float, default=20.0, help="no run starts with less time than this left")
    b.add_argument(
        "--raw-client",
        action="store_true",
        help="vLLM's client as shipped, which loses CRLF-separated events (accept_crlf_events)",
    )
    b.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("out")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return bench_serve(args) if args.command == "bench-serve" else table(args)


if __name__ == "__main__":
    sys.exit(main())
