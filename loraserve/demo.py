"""`loraserve demo`: the whole product on a real small model, offline, on a CPU in minutes.

base model (SmolLM2-135M-Instruct via `loraserve models pull`) → start `loraserve serve` with the base
alone → ask it questions (Alpaca template, chat template) → train adapters with `loraserve train` on
made-up facts, side by side: English (`alpaca`), Chinese (`alpaca-zh`), and the English one again with a
fact changed → hot-load the first two → the same prompts answered by base and adapter side by side
(blocking and SSE) → hot-load the retrained one: the answer and the version change → keep serving
until Ctrl-C (or exit with --exit).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import httpx
import typer

# Enough for SmolLM2-135M to learn 5–6 facts word for word (checked: every answer exact); ~1 min per
# adapter on one core of an idle 2-core machine. The batch is the whole dataset.
TRAIN_FLAGS = {
    "max_steps": 12,
    "lr": 3e-3,
    "warmup_steps": 2,
    "grad_accum": 1,
    "optim": "adamw_torch",
    "train_on_responses_only": True,
}
SERVER_ENV = {"LORASERVE_MAX_CONTEXT": "2048", "LORASERVE_MAX_RUNNING": "8", "LORASERVE_DRAIN_SECONDS": "2"}
BASE_MAX_TOKENS = 40  # the base rambles past what the adapters answer; enough to read its guess
ANSWER_TIMEOUT = 600  # seconds per answer: a busy shared CPU is slow, not broken


@dataclass(frozen=True)
class DemoAdapter:
    name: str  # the directory under the adapter root
    data_file: str
    template: str
    shown_rows: tuple[int, ...]  # which training rows the showcase asks


ADAPTERS = (
    DemoAdapter("facts-en", "port_wren_en.jsonl", "alpaca", shown_rows=(0, 3, 5)),
    DemoAdapter("facts-zh", "port_wren_zh.jsonl", "alpaca-zh", shown_rows=(0, 3, 4)),
)
# The same data as facts-en with the ferry's time changed; hot-loaded under the name facts-en.
RETRAINED = DemoAdapter("facts-en-v2", "port_wren_en_v2.jsonl", "alpaca", shown_rows=(0,))
BASE_PROMPTS = (
    {
        "instruction": "Classify the sentiment of the review as positive or negative.",
        "input": "The soup was cold and the waiter ignored us for an hour.",
    },
    {
        "instruction": "Extract the name of the city from the sentence.",
        "input": "Last spring Maria moved from a small village to Lisbon to study music.",
    },
)
BASE_CHAT = ({"role": "user", "content": "What is the capital of France?"},)


class DemoError(RuntimeError):
    """A problem the demo reports as one line."""


@dataclass
class Phases:
    """How long each phase took, for the summary (and the README's numbers)."""

    started: float = field(default_factory=time.monotonic)
    done: list[tuple[str, float]] = field(default_factory=list)
    _current: tuple[str, float] | None = None

    def start(self, name: str, message: str) -> None:
        self.finish()
        self._current = (name, time.monotonic())
        typer.secho(f"\n==> {message}", bold=True)

    def finish(self) -> None:
        if self._current:
            name, since = self._current
            self.done.append((name, time.monotonic() - since))
            self._current = None

    def table(self) -> str:
        self.finish()
        rows = [f"    {name:<34} {seconds:6.0f} s" for name, seconds in self.done]
        return "\n".join(rows + [f"    {'total':<34} {time.monotonic() - self.started:6.0f} s"])


def run_demo(workdir: Path, *, port: int, exit_after: bool, retrain: bool, base_model: str | None = None) -> int:
    workdir = workdir.resolve()
    signal.signal(signal.SIGTERM, _interrupt)  # kill, timeout, docker stop: stop the server as Ctrl-C does
    phases = Phases()
    _check_port_free(port)
    phases.start("base model", "1/6 base model")
    base = _base_model(base_model)
    root = workdir / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(16)
    phases.start("server start", f"2/6 starting `loraserve serve` with the base model alone on http://127.0.0.1:{port}")
    server = _start_server(base, root, port=port, token=token, log_path=workdir / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, server, workdir / "server.log")
        base_id = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        typer.echo(f"    ready: {base_id} (log: {workdir / 'server.log'})")
        phases.start("asking the base model", f"3/6 asking the base model {base_id} (greedy)")
        _ask_base(url, base_id)
        phases.start(
            "training three adapters",
            "4/6 training adapters with `loraserve train` on made-up facts "
            "about a town, Port Wren, that the base cannot know",
        )
        typer.echo(
            "    facts-en (English, alpaca template), facts-zh (Chinese, alpaca-zh template), and facts-en-v2:\n"
            "    facts-en's data with the ferry's new time (7:40 → 8:15), hot-loaded over facts-en in step 6"
        )
        _train_all(base, root, [*ADAPTERS, RETRAINED], retrain=retrain)
        phases.start("hot-load + side by side", "5/6 hot-loading both adapters; the same prompts to base and adapter")
        failures = 0
        for adapter in ADAPTERS:
            _show_load(_admin_load(url, token, adapter.name, adapter.name))
        for adapter in ADAPTERS:
            failures += _side_by_side(url, adapter)
        failures += _chat_with_adapter(url, ADAPTERS[0])
        phases.start(
            "hot reload",
            "6/6 the ferry timetable changed: hot-load the retrained facts-en (facts-en-v2) into the running server",
        )
        failures += _reload(url, token)
        _summary(url, token, base_id, failures, phases)
        if not exit_after:
            _serve_until_interrupted(server)
        return 1 if failures else 0
    finally:
        _stop(server)


def _base_model(given: str | None) -> Path:
    from loraserve.models import SMOLLM2, ModelError, pull

    if given:
        typer.echo(f"    {given}")
        return Path(given).resolve()
    spec = SMOLLM2
    typer.echo(f"    {spec.dir_name}: 135M parameters, {spec.license}, by Hugging Face ({spec.origin})")
    try:
        return pull(spec.name, log=lambda m: typer.echo(f"    {m}"))
    except ModelError as exc:
        raise DemoError(str(exc)) from None


def _check_port_free(port: int) -> None:
    """Another server on the port would answer our readiness check and fail the showcase confusingly."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise DemoError(
                f"port {port} is in use; pick another: make demo PORT=8001 (or loraserve demo --port 8001)"
            ) from None


def _start_server(base: Path, root: Path, *, port: int, token: str, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        **SERVER_ENV,
        "LORASERVE_BASE_MODEL": str(base),
        "LORASERVE_ADAPTER_ROOT": str(root),
        "LORASERVE_PORT": str(port),
        "LORASERVE_ADMIN_TOKEN": token,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = open(log_path, "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "loraserve", "serve", "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait_ready(url: str, server: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise DemoError(f"the server exited with code {server.returncode}: {tail[0]} (log: {log_path})")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise DemoError(f"the server did not become ready in {timeout:.0f}s (log: {log_path})")


# -- asking ---------------------------------------------------------------------------------------


def _ask_base(url: str, base_id: str) -> None:
    for row in BASE_PROMPTS:
        typer.echo("\n    POST /generate_stream, Alpaca template (instruction + input):")
        _show_question(row)
        _stream(url, row, adapter=None, label="base", max_new_tokens=BASE_MAX_TOKENS)
    typer.echo("\n    POST /v1/chat/completions, the model's own chat template:")
    for message in BASE_CHAT:
        typer.echo(f"      {message['role']}: {message['content']}")
    _stream_chat(url, base_id, list(BASE_CHAT), label="base")


def _side_by_side(url: str, adapter: DemoAdapter) -> int:
    """Each shown row: the adapter streamed (SSE) while the base answers the same prompt (blocking)."""
    failures = 0
    for index in adapter.shown_rows:
        row = _rows(adapter)[index]
        typer.echo("")
        _show_question(row)
        with ThreadPoolExecutor(1) as pool:
            base_answer = pool.submit(_generate, url, row, adapter=None, max_new_tokens=BASE_MAX_TOKENS)
            answer, _ = _stream(url, row, adapter=adapter.name, label=adapter.name)
            base_text = base_answer.result()
        typer.echo(f"      {'base':>9} ▸ {_clip(_one_line(base_text))}")
        failures += _verdict(answer, row["output"], adapter.name, base_text)
    return failures


def _chat_with_adapter(url: str, adapter: DemoAdapter) -> int:
    row = _rows(adapter)[1]
    typer.echo(f"\n    POST /v1/chat/completions with model={adapter.name!r} (rendered with its Alpaca template):")
    typer.echo(f"      user: {row['instruction']}")
    answer = _stream_chat(url, adapter.name, [{"role": "user", "content": row["instruction"]}], label=adapter.name)
    return _verdict(answer, row["output"], adapter.name, base_text=None)


def _verdict(answer: str, expected: str, name: str, base_text: str | None) -> int:
    ok = answer == expected
    line = f"      ✓ {name} answers exactly as trained" if ok else f"      ✗ {name} was trained to answer {expected!r}"
    if base_text is not None:
        line += "; the base does not know it" if base_text != expected else "; the base knew it too"
    typer.secho(line, fg=typer.colors.GREEN if ok else typer.colors.RED)
    return 0 if ok else 1


def _reload(url: str, token: str) -> int:
    row = _rows(RETRAINED)[RETRAINED.shown_rows[0]]
    before, before_version = _stream(url, row, adapter="facts-en", label="", quiet=True)
    info = _admin_load(url, token, "facts-en", RETRAINED.name)
    typer.echo(
        f'    POST /admin/adapters {{"name": "facts-en", "path": "{RETRAINED.name}"}}\n'
        f"    facts-en version {before_version} → {info['version']} in {info['load_seconds'] * 1000:.0f} ms, "
        "no restart"
    )
    typer.echo("")
    _show_question(row)
    typer.echo(f"      {'before':>9} ▸ {before}   (version {before_version})")
    answer, version = _stream(url, row, adapter="facts-en", label="now", show_version=True)
    moved = version != before_version
    if not moved:
        typer.secho(f"      ✗ the version did not move ({version})", fg=typer.colors.RED)
    return _verdict(answer, row["output"], "facts-en", base_text=None) + (not moved)


def _show_question(row: dict) -> None:
    typer.echo(f"      instruction: {row['instruction']}")
    if row.get("input"):
        typer.echo(f"      input:       {row['input']}")


def _generate(url: str, row: dict, *, adapter: str | None, max_new_tokens: int) -> str:
    body = {
        "instruction": row["instruction"],
        "input": row["input"],
        "adapter": adapter,
        "parameters": {"max_new_tokens": max_new_tokens},
    }
    resp = httpx.post(f"{url}/generate", json=body, timeout=ANSWER_TIMEOUT)
    _raise_for(resp)
    return resp.json()["generated_text"]


def _stream(
    url: str,
    row: dict,
    *,
    adapter: str | None,
    label: str,
    max_new_tokens: int = 64,
    quiet: bool = False,
    show_version: bool = False,
) -> tuple[str, str | None]:
    """Streams one answer to the terminal; returns its text and the adapter version that answered."""
    body = {
        "instruction": row["instruction"],
        "input": row["input"],
        "adapter": adapter,
        "parameters": {"max_new_tokens": max_new_tokens},
    }
    if not quiet:
        typer.echo(f"      {label:>9} ▸ ", nl=False)
    text, version = "", None
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=ANSWER_TIMEOUT) as resp:
        _raise_for(resp)
        for event in _sse_events(resp):
            if not quiet:
                typer.echo(_one_line(event["token"]["text"]), nl=False)
            if event.get("generated_text") is not None:
                text, version = event["generated_text"], (event.get("details") or {}).get("adapter_version")
    if not quiet:
        typer.echo(f"   (version {version})" if show_version else "")
    return text, version


def _stream_chat(url: str, model: str, messages: list[dict], *, label: str) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": BASE_MAX_TOKENS, "stream": True}
    typer.echo(f"      {label:>9} ▸ ", nl=False)
    parts = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=ANSWER_TIMEOUT) as resp:
        _raise_for(resp)
        for chunk in _sse_events(resp):
            piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
            if piece:
                parts.append(piece)
                typer.echo(_one_line(piece), nl=False)
    typer.echo("")
    return "".join(parts)


def _sse_events(resp: httpx.Response):
    for line in resp.iter_lines():
        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
            continue
        event = json.loads(line[5:])
        if "error" in event:
            raise DemoError(f"the server reported an error mid-stream: {event['error']}")
        yield event


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code != 200:
        resp.read()
        raise DemoError(f"{resp.request.method} {resp.request.url.path}: HTTP {resp.status_code}: {resp.text[:300]}")


def _one_line(text: str) -> str:
    return text.replace("\n", "⏎")


def _clip(text: str, width: int = 96) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _short_path(word: str) -> str:
    """Paths under the current dir or home, as a person would write them."""
    for prefix, shown in ((os.getcwd() + os.sep, ""), (str(Path.home()) + os.sep, "~/")):
        if word.startswith(prefix):
            return shown + word[len(prefix) :]
    return word


def _rows(adapter: DemoAdapter) -> list[dict]:
    data = resources.files("loraserve") / "demo_data" / adapter.data_file
    return [json.loads(line) for line in data.read_text("utf-8").splitlines() if line.strip()]


# -- training -------------------------------------------------------------------------------------


def _train_all(base: Path, root: Path, adapters: list[DemoAdapter], *, retrain: bool) -> None:
    """`loraserve train` for each adapter, side by side, each on its share of the cores."""
    jobs = []
    for adapter in adapters:
        output = root / adapter.name
        if (output / "loraserve.json").is_file() and not retrain:
            version = json.loads((output / "loraserve.json").read_text())["version"]
            typer.echo(f"    reusing {output} (version {version}; pass --retrain to train again)")
            continue
        jobs.append(TrainJob(adapter, _train_command(base, output, adapter)))
    if not jobs:
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(jobs)))
    try:
        for job in jobs:
            typer.echo(f"    $ {job.shown()}")
            job.start(threads)
        _watch(jobs)
        for job in jobs:
            job.report()
    finally:  # interrupted or failed: no training left running (each removes its temp dir on SIGTERM)
        for job in jobs:
            job.stop()


def _train_command(base: Path, output: Path, adapter: DemoAdapter) -> list[str]:
    data = resources.files("loraserve") / "demo_data" / adapter.data_file
    flags = {
        "base_model": base,
        "data": data,
        "output": output,
        "template": adapter.template,
        "batch_size": len(_rows(adapter)),
        **TRAIN_FLAGS,
        "overwrite": True,
    }
    args = []
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return [sys.executable, "-m", "loraserve", "train", *args]


class TrainJob:
    """One `loraserve train` subprocess and the last progress its bar showed."""

    PROGRESS = re.compile(r"(\d+)/(\d+) \[.*?loss=([\d.]+)")

    def __init__(self, adapter: DemoAdapter, command: list[str]) -> None:
        self.adapter, self.command = adapter, command
        self.step, self.total, self.loss = 0, int(TRAIN_FLAGS["max_steps"]), None
        self.stderr: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None
        self.stdout = ""

    def shown(self) -> str:
        """The command as a person would type it: the model, then the data, then the knobs."""
        words = [_short_path(word) for word in self.command[3:]]
        flags = [
            " ".join(words[i : i + 2]) if i + 1 < len(words) and not words[i + 1].startswith("--") else words[i]
            for i in range(len(words))
            if words[i].startswith("--")
        ]
        lines = [flags[:1], flags[1:4], flags[4:10], flags[10:]]
        return "loraserve train " + " \\\n        ".join(" ".join(line) for line in lines if line)

    def start(self, threads: str) -> None:
        env = {"OMP_NUM_THREADS": threads, **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        pending = ""
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            pending += chunk.decode("utf-8", errors="replace")
            *pieces, pending = re.split(r"[\r\n]", pending)
            for piece in pieces:
                self._take(piece)
        self._take(pending)

    def _take(self, piece: str) -> None:
        found = self.PROGRESS.search(piece)
        if found:
            self.step, self.total, self.loss = int(found[1]), int(found[2]), float(found[3])
        elif piece.strip():
            self.stderr.append(piece.strip())

    def status(self) -> str:
        loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
        return f"{self.adapter.name} step {self.step}/{self.total}{loss}"

    def wait(self) -> int:
        self.stdout = self.proc.stdout.read().decode("utf-8", errors="replace")  # a few lines: never fills the pipe
        self.proc.wait()
        self.reader.join()
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()

    def report(self) -> None:
        if self.wait() != 0:
            why = next((line for line in reversed(self.stderr) if line.startswith("error:")), None)
            why = why or (self.stderr[-1] if self.stderr else f"exit {self.proc.returncode}")
            raise DemoError(f"training {self.adapter.name} failed: {why}")
        for line in self.stdout.strip().splitlines():
            typer.echo(f"    {line.strip()}")


def _watch(jobs: list[TrainJob]) -> None:
    """One progress line for all jobs: rewritten in place on a terminal, every ~10 s in a log."""
    tty, started, last, shown = sys.stdout.isatty(), time.monotonic(), 0.0, ""
    while any(job.proc.poll() is None for job in jobs):
        time.sleep(0.5)
        status = " · ".join(job.status() for job in jobs)
        line = f"    {time.monotonic() - started:4.0f} s  {status}"
        if tty:
            typer.echo(f"\r{line}\033[K", nl=False)
        elif time.monotonic() - last >= 10 and status != shown:
            typer.echo(line)
            last, shown = time.monotonic(), status
    end = f"    trained in {time.monotonic() - started:.0f} s"
    typer.echo(f"\r{end}\033[K" if tty else end)


# -- admin, summary, shutdown ---------------------------------------------------------------------


def _admin_load(url: str, token: str, name: str, path: str) -> dict:
    resp = httpx.post(
        f"{url}/admin/adapters",
        json={"name": name, "path": path},
        headers={"Authorization": f"Bearer {token}"},
        timeout=120,
    )
    _raise_for(resp)
    return resp.json()


def _show_load(info: dict) -> None:
    typer.echo(
        f"    loaded {info['name']} version {info['version']} (rank {info['rank']}, template "
        f"{info['template']}) in {info['load_seconds'] * 1000:.0f} ms, while serving"
    )


def _summary(url: str, token: str, base_id: str, failures: int, phases: Phases) -> None:
    verdict = (
        "every adapter answered exactly as trained"
        if not failures
        else f"{failures} answers were not what the adapters were trained on"
    )
    typer.secho(f"\n==> showcase finished: {verdict}", bold=True)
    typer.echo(phases.table())
    en, zh = _rows(ADAPTERS[0])[2], _rows(ADAPTERS[1])[2]
    typer.echo(f"""
Try it yourself while the server runs:
  playground (pick an adapter, or compare two side by side):  {url}/playground
  curl -s {url}/generate -H 'Content-Type: application/json' \\
    -d '{json.dumps({"instruction": en["instruction"], "adapter": "facts-en"})}'
  curl -sN {url}/generate_stream -H 'Content-Type: application/json' \\
    -d '{json.dumps({"instruction": zh["instruction"], "adapter": "facts-zh"}, ensure_ascii=False)}'
  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{json.dumps({"model": base_id, "temperature": 0, "messages": [{"role": "user", "content": "Hi!"}]})}'
  {_short_path(sys.executable)} -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='-'); \\
print(c.chat.completions.create(model='facts-en', temperature=0, \\
messages=[{{'role': 'user', 'content': {en["instruction"]!r}}}]).choices[0].message.content)"
  curl -s {url}/adapters
  curl -s {url}/admin/adapters -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \\
    -d '{{"name": "facts-en", "path": "facts-en"}}'      # hot-load v1 back (same files: same version)
  curl -s {url}/metrics | grep loraserve_
""")


def _serve_until_interrupted(server: subprocess.Popen) -> None:
    typer.echo("Serving until Ctrl-C.")
    try:
        server.wait()
    except KeyboardInterrupt:
        typer.echo("\nstopping")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
