"""`loraserve demo`: the whole product offline on a CPU in a few minutes.

build the tiny base → train two adapters (English facts with `alpaca`, Chinese facts with
`alpaca-zh`) → start `loraserve serve` → hot-load both through the admin API → stream answers from
each adapter and from the bare base → keep serving until Ctrl-C (or exit with --exit).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import httpx
import typer

DEMO_STEPS = {"max_steps": 200, "lr": 1e-2, "batch_size": 16, "grad_accum": 1, "warmup_steps": 10}
QUESTIONS_PER_ADAPTER = 3


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    data_file: str
    template: str


ADAPTERS = (DemoAdapter("facts-en", "facts_en.jsonl", "alpaca"), DemoAdapter("facts-zh", "facts_zh.jsonl", "alpaca-zh"))


def run_demo(workdir: Path, *, port: int, exit_after: bool, retrain: bool) -> int:
    from loraserve.tiny_model import build_tiny_model

    workdir = workdir.resolve()
    _say(f"1/5 base model: building the tiny random Llama in {workdir / 'base'}")
    base = build_tiny_model(workdir / "base")
    root = workdir / "adapters"
    for i, adapter in enumerate(ADAPTERS):
        _say(f"2/5 training adapter {adapter.name!r} ({adapter.template} template) [{i + 1}/{len(ADAPTERS)}]")
        _train(base, root / adapter.name, adapter, retrain=retrain)
    token = secrets.token_urlsafe(16)
    _check_port_free(port)
    _say(f"3/5 starting the server on http://127.0.0.1:{port}")
    server = _start_server(base, root, port=port, token=token)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server)
        _say("4/5 hot-loading both adapters through the admin API")
        for adapter in ADAPTERS:
            info = _admin_load(url, token, adapter.name)
            typer.echo(f"    loaded {info['name']} version {info['version']} (rank {info['rank']}, "
                       f"template {info['template']}) in {info['load_seconds'] * 1000:.0f} ms")
        _say("5/5 asking each adapter, and the bare base model, questions from its training data")
        failures = sum(_showcase(url, adapter) for adapter in ADAPTERS)
        _summary(url, token, failures)
        if not exit_after:
            _serve_until_interrupted(server)
        return 1 if failures else 0
    finally:
        _stop(server)


def _train(base: Path, output: Path, adapter: DemoAdapter, *, retrain: bool) -> None:
    from training.config import TrainConfig
    from training.fit import train

    if (output / "loraserve.json").is_file() and not retrain:
        typer.echo(f"    reusing {output} (pass --retrain to train again)")
        return
    data = resources.files("loraserve") / "demo_data" / adapter.data_file
    cfg = TrainConfig(base_model=str(base), data=str(data), output=output, template=adapter.template,
                      name=adapter.name, optim="adamw_torch", overwrite=True, **DEMO_STEPS)
    result = train(cfg, log=lambda m: typer.echo(f"    {m}"))
    typer.echo(f"    done in {result.seconds:.1f}s, final loss {result.manifest.loss.final:.4f}, "
               f"version {result.manifest.version}")


def _check_port_free(port: int) -> None:
    """Another server on the port would answer our readiness check and fail the showcase confusingly."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(f"port {port} is in use; pass --port to pick another") from None


class DemoError(RuntimeError):
    """A problem the demo reports as one line."""


def _start_server(base: Path, root: Path, *, port: int, token: str) -> subprocess.Popen:
    env = {**os.environ, "LORASERVE_BASE_MODEL": str(base), "LORASERVE_ADAPTER_ROOT": str(root),
           "LORASERVE_PORT": str(port), "LORASERVE_ADMIN_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "loraserve", "serve", "--log-level", "warning"], env=env)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise DemoError(f"the server exited with code {server.returncode} (its log is above)")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError("the server did not become ready")


def _admin_load(url: str, token: str, name: str) -> dict:
    resp = httpx.post(f"{url}/admin/adapters", json={"name": name, "path": name},
                      headers={"Authorization": f"Bearer {token}"}, timeout=120)
    resp.raise_for_status()
    return resp.json()


def _showcase(url: str, adapter: DemoAdapter) -> int:
    rows = _rows(adapter)[:QUESTIONS_PER_ADAPTER]
    failures = 0
    for row in rows:
        typer.echo(f"\n    [{adapter.name}] {row['instruction']} {row['input']}".rstrip())
        answer = _stream(url, row, adapter=adapter.name, label=adapter.name)
        ok = answer == row["output"]
        failures += not ok
        typer.secho("      ✓ matches its training data" if ok else f"      ✗ expected {row['output']!r}",
                    fg=typer.colors.GREEN if ok else typer.colors.RED)
        base_answer = _stream(url, row, adapter=None, label="base", max_new_tokens=24)
        typer.echo("      (the base model alone " + ("also knew it)" if base_answer == row["output"] else "does not know it)"))
    return failures


def _stream(url: str, row: dict, *, adapter: str | None, label: str, max_new_tokens: int = 64) -> str:
    body = {"instruction": row["instruction"], "input": row["input"], "adapter": adapter,
            "parameters": {"max_new_tokens": max_new_tokens}}
    typer.echo(f"      {label:>8} ▸ ", nl=False)
    text = ""
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=120) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise RuntimeError(event["error"])
            typer.echo(event["token"]["text"].replace("\n", "⏎"), nl=False)
            if event.get("generated_text") is not None:
                text = event["generated_text"]
    typer.echo("")
    return text


def _rows(adapter: DemoAdapter) -> list[dict]:
    data = resources.files("loraserve") / "demo_data" / adapter.data_file
    return [json.loads(line) for line in data.read_text("utf-8").splitlines() if line.strip()]


def _summary(url: str, token: str, failures: int) -> None:
    verdict = "every adapter answered its own facts" if not failures else f"{failures} answers did not match"
    _say(f"showcase finished: {verdict}")
    row = _rows(ADAPTERS[0])[0]
    typer.echo(f"""
Try it yourself while the server runs:
  curl -s {url}/generate -H 'Content-Type: application/json' \\
    -d '{json.dumps({"instruction": row["instruction"], "adapter": "facts-en"})}'
  curl -sN {url}/generate_stream -H 'Content-Type: application/json' \\
    -d '{json.dumps({"instruction": _rows(ADAPTERS[1])[0]["instruction"], "adapter": "facts-zh"}, ensure_ascii=False)}'
  curl -s {url}/adapters
  curl -s {url}/admin/adapters -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{{"name": "facts-en", "path": "facts-en"}}'      # hot reload
  curl -s {url}/metrics | grep loraserve_
""")


def _serve_until_interrupted(server: subprocess.Popen) -> None:
    typer.echo("Serving until Ctrl-C.")
    try:
        server.wait()
    except KeyboardInterrupt:
        typer.echo("\nstopping")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def _say(message: str) -> None:
    typer.secho(f"\n==> {message}", bold=True)
