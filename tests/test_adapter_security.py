"""The admin hot-load's defenses (DESIGN.md "Hostile inputs and faults", 7-17, 21 and 23).

Most cases are units on `server.adapters.checks` with the real tiny model's shapes and fingerprint and
copies of a trained adapter mutated in tmp dirs; an audit hook plus a spy on safetensors prove what a
refused load opened. One live server (module-scoped) then proves the HTTP status codes, that nothing
gets registered and that the server stays ready; plus reloads, concurrent loads, unload during a
stream, and the admin token / API keys. Generation itself is tested in test_server_generation.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import shutil
import struct
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from contract.fingerprint import base_fingerprint
from contract.manifest import MANIFEST_FILE
from server.adapters.checks import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BaseShapes,
    base_shapes,
    check_adapter_dir,
    load_weights,
    resolve_under_root,
)
from server.errors import BadRequest, ServeError
from tests.live import ADMIN_TOKEN, LiveServer

pytestmark = pytest.mark.slow

BIG = 2 * 1024**3
API_KEYS = ["k1", "k2"]
KEY = {"Authorization": "Bearer k2"}


# --- helpers: adapter dirs -------------------------------------------------------------------------


def copy_adapter(src: Path, dest: Path, *, manifest: bool = True) -> Path:
    shutil.copytree(src, dest)
    if not manifest:
        (dest / MANIFEST_FILE).unlink()
    return dest


_DELETE = object()  # edit_json(..., key=_DELETE) removes the key


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text("utf-8"))
    for key, value in changes.items():
        if value is _DELETE:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data), "utf-8")


def tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / WEIGHTS_FILE))


def write_tensors(d: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(d / WEIGHTS_FILE), metadata={"format": "pt"})


def with_rank(d: Path, rank: int) -> Path:
    """Same modules, random weights of another rank, config to match (no manifest: its hash would lie)."""
    gen = torch.Generator().manual_seed(rank)
    state = {}
    for key, t in tensors(d).items():
        shape = (rank, t.shape[1]) if ".lora_A." in key else (t.shape[0], rank)
        state[key] = torch.randn(shape, generator=gen) * 0.01
    write_tensors(d, state)
    edit_json(d / CONFIG_FILE, r=rank, lora_alpha=rank)
    (d / MANIFEST_FILE).unlink(missing_ok=True)
    return d


def first_key(d: Path, part: str = "lora_A", module: str = "q_proj") -> str:
    return next(k for k in sorted(tensors(d)) if f".{module}.{part}." in k)


class Evil:
    """Unpickling this writes `target`: a canary that proves whether any code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pickle code ran"))


def evil_pickle(path: Path, canary: Path) -> None:
    torch.save(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(16, 128),
            "payload": Evil(canary),
        },
        path,
    )


def header(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def lying_safetensors(d: Path, how: str) -> None:
    path = d / WEIGHTS_FILE
    data = path.read_bytes()
    n, head, body = header(path)
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "header-10GB":
        path.write_bytes(struct.pack("<Q", 10 * 10**9) + data[8:])
    elif how == "header-past-end":
        path.write_bytes(struct.pack("<Q", 50 * 10**6) + data[8:])
    elif how == "offsets-past-end":
        key = sorted(k for k in head if k != "__metadata__")[-1]
        head[key]["data_offsets"] = [head[key]["data_offsets"][0], 10 * 10**9]
        raw = json.dumps(head).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    elif how == "shape-1Tx1T":
        raw = json.dumps(
            {
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": {
                    "dtype": "F32",
                    "shape": [1 << 20, 1 << 20],
                    "data_offsets": [0, 16],
                }
            }
        ).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    elif how == "empty-file":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 16)
    else:
        raise AssertionError(how)


# --- helpers: what a refused load touched -----------------------------------------------------------

_OPENED: list[str] | None = None  # the list of the `watch()` block that runs, if any


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


_HOOKED = False


@pytest.fixture
def watch(monkeypatch):
    """`with watch() as seen:` lists every file opened inside the block: Python-level opens (an audit
    hook) and safetensors' own (a spy: its Rust code opens files without an audit event)."""
    global _HOOKED
    import safetensors
    import safetensors.torch

    if not _HOOKED:  # audit hooks cannot be removed: install once, switch with _OPENED
        sys.addaudithook(_audit)
        _HOOKED = True

    def spy(real):
        def record(filename, *args, **kwargs):
            if _OPENED is not None:
                _OPENED.append(os.fsdecode(filename))
            return real(filename, *args, **kwargs)

        return record

    monkeypatch.setattr(safetensors, "safe_open", spy(safetensors.safe_open))
    monkeypatch.setattr(safetensors.torch, "load_file", spy(safetensors.torch.load_file))

    @contextmanager
    def watching():
        global _OPENED
        _OPENED = seen = []
        try:
            yield seen
        finally:
            _OPENED = None

    return watching


def touched(opened: list[str], where: Path) -> list[str]:
    where = str(where.resolve())
    return [p for p in opened if os.path.realpath(p).startswith(where) or p.startswith(where)]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tiny_model_dir) -> BaseShapes:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return base_shapes(model, base_fingerprint(model.config, tokenizer))


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def outside(tmp_path, trained_adapters) -> Path:
    """A valid adapter next to (not under) the root: an escape must not load it."""
    return copy_adapter(trained_adapters.en, tmp_path / "outside")


@pytest.fixture
def adapter(root, trained_adapters) -> Path:
    """A fresh copy of the trained English adapter, with its manifest, under the root."""
    return copy_adapter(trained_adapters.en, root / "a")


@pytest.fixture
def bare(root, trained_adapters) -> Path:
    """The same adapter without its manifest (so tensors and config can change without a stale hash)."""
    return copy_adapter(trained_adapters.en, root / "a", manifest=False)


def check(root: Path, rel: str, base: BaseShapes, *, max_rank: int = 256, max_bytes: int = BIG):
    return check_adapter_dir(resolve_under_root(root, rel), root, base, max_rank=max_rank, max_bytes=max_bytes)


@contextmanager
def refused(status: int, *words: str):
    with pytest.raises(ServeError) as info:
        yield info
    exc = info.value
    assert exc.status == status, f"{type(exc).__name__} {exc.status}: {exc.message}"
    for word in words:
        assert word.lower() in exc.message.lower(), f"{word!r} not in {exc.message!r}"


# --- the positive controls: without them every refusal below could pass vacuously -------------------


def test_trained_adapter_passes_and_the_spy_sees_its_files(root, adapter, base, watch):
    with watch() as opened:
        checked = check(root, "a", base)
        weights = load_weights(checked)
    assert checked.manifest is not None and checked.manifest.base_model.fingerprint == base.fingerprint
    assert checked.config["r"] == 16 and len(weights) == 28
    assert touched(opened, adapter / WEIGHTS_FILE) and touched(opened, adapter / CONFIG_FILE)


def test_links_that_stay_inside_the_root_are_fine(root, adapter, base):
    (root / "alias").symlink_to(adapter, target_is_directory=True)
    shared = root / "shared"
    shared.mkdir()
    (adapter / WEIGHTS_FILE).rename(shared / "w.safetensors")
    (adapter / WEIGHTS_FILE).symlink_to(shared / "w.safetensors")
    assert check(root, "alias", base).weights_bytes == (shared / "w.safetensors").stat().st_size


# --- 8: paths ---------------------------------------------------------------------------------------

ESCAPES = {
    "absolute-outside": "{outside}",
    "absolute-etc": "/etc",
    "dotdot": "../outside",
    "dotdot-alone": "..",
    "inner-dotdot": "a/../../outside",
    "percent-encoded": "%2e%2e/outside",
    "percent-slash": "..%2foutside",
    "backslashes": "..\\outside",
    "nul": "a\x00/../../outside",
    "tilde": "~/outside",
    "tilde-user": "~root",
    "too-long": "a/" * 300,
}


@pytest.mark.parametrize("rel", ESCAPES.values(), ids=ESCAPES.keys())
def test_path_escapes_are_refused_before_anything_is_opened(root, adapter, outside, base, watch, rel):
    with watch() as opened, refused(400, "path"):
        check(root, rel.format(outside=outside), base)
    assert not touched(opened, outside)


def test_symlinked_dir_leaving_the_root_is_403_and_unopened(root, outside, base, watch):
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "deep").mkdir()
    (root / "deep" / "up").symlink_to(outside.parent, target_is_directory=True)
    with watch() as opened:
        with refused(403, "leaves the adapter root"):
            check(root, "link", base)
        with refused(403):
            check(root, "deep/up/outside", base)
    assert not touched(opened, outside)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE, MANIFEST_FILE])
def test_symlinked_file_leaving_the_root_is_403_and_unopened(root, adapter, outside, base, watch, name):
    (adapter / name).unlink()
    (adapter / name).symlink_to(outside / name)
    with watch() as opened, refused(403, name):
        check(root, "a", base)
    assert not touched(opened, outside)


def test_missing_dir_is_404(root, base):
    with refused(404):
        check(root, "nope", base)


# --- 9: pickle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_only_adapter_is_refused(root, bare, base, watch, suffix):
    torch.save(tensors(bare), bare / f"adapter_model{suffix}")
    (bare / WEIGHTS_FILE).unlink()
    with watch() as opened, refused(400, "pickle", "safetensors"):
        check(root, "a", base)
    assert not touched(opened, bare / f"adapter_model{suffix}")


def test_the_canary_is_live(tmp_path):
    """The payload really runs on a plain torch.load: so its absence below means no code ran."""
    evil_pickle(tmp_path / "control.bin", tmp_path / "control-canary")
    torch.load(tmp_path / "control.bin", weights_only=False)
    assert (tmp_path / "control-canary").read_text() == "pickle code ran"


def test_malicious_pickle_runs_no_code(root, bare, base, tmp_path):
    canary = tmp_path / "canary"
    (bare / WEIGHTS_FILE).unlink()
    evil_pickle(bare / "adapter_model.bin", canary)
    with refused(400, "pickle"):
        check(root, "a", base)
    assert not canary.exists()


def test_pickle_beside_safetensors_is_never_read(root, adapter, base, tmp_path, watch):
    canary = tmp_path / "canary"
    evil_pickle(adapter / "adapter_model.bin", canary)
    with watch() as opened:
        load_weights(check(root, "a", base))
    assert not canary.exists()
    assert not touched(opened, adapter / "adapter_model.bin")


# --- 10: config -----------------------------------------------------------------------------------

CONFIGS = {  # id: (change, words the 400 must carry)
    "missing": (None, [CONFIG_FILE, "missing"]),
    "not-json": ("{r: 16,", ["not valid JSON"]),
    "not-utf8": (b"\xff\xfe{}", ["not valid JSON"]),
    "not-object": ("[16]", ["JSON object"]),
    "huge": ('{"r": 16, "pad": "' + "x" * 70_000 + '"}', ["larger than"]),
    "no-r": ({"r": _DELETE}, ["'r'"]),
    "r-zero": ({"r": 0}, ["'r'", "positive integer"]),
    "r-negative": ({"r": -16}, ["'r'"]),
    "r-string": ({"r": "16"}, ["'r'"]),
    "r-true": ({"r": True}, ["'r'"]),
    "r-float": ({"r": 16.0}, ["'r'"]),
    "r-null": ({"r": None}, ["'r'"]),
    "alpha-zero": ({"lora_alpha": 0}, ["lora_alpha"]),
    "alpha-string": ({"lora_alpha": "16"}, ["lora_alpha"]),
    "alpha-bool": ({"lora_alpha": True}, ["lora_alpha"]),
    "alpha-nan": ("NAN", ["lora_alpha"]),
    "alpha-inf": ("INF", ["lora_alpha"]),
    "use-dora": ({"use_dora": True}, ["use_dora"]),
    "fan-in-fan-out": ({"fan_in_fan_out": True}, ["fan_in_fan_out"]),
    "modules-to-save": ({"modules_to_save": ["lm_head"]}, ["modules_to_save"]),
    "rank-pattern": ({"rank_pattern": {"q_proj": 8}}, ["rank_pattern"]),
    "layers-to-transform": ({"layers_to_transform": [0]}, ["layers_to_transform"]),
    "bias-all": ({"bias": "all"}, ["bias"]),
    "bias-lora-only": ({"bias": "lora_only"}, ["bias"]),
    "prefix-tuning": ({"peft_type": "PREFIX_TUNING"}, ["only LoRA", "PREFIX_TUNING"]),
    "no-targets": ({"target_modules": _DELETE}, ["target_modules"]),
    "empty-targets": ({"target_modules": []}, ["target_modules"]),
    "targets-string": ({"target_modules": "all-linear"}, ["target_modules"]),
}


def apply_config(d: Path, change) -> None:
    path = d / CONFIG_FILE
    if change is None:
        path.unlink()
    elif isinstance(change, bytes):
        path.write_bytes(change)
    elif change in ("NAN", "INF"):
        text = json.dumps({**json.loads(path.read_text()), "lora_alpha": math.nan if change == "NAN" else math.inf})
        assert "NaN" in text or "Infinity" in text  # what Python's json writes and reads back
        path.write_text(text)
    elif isinstance(change, str):
        path.write_text(change)
    else:
        edit_json(path, **change)


@pytest.mark.parametrize("change,words", CONFIGS.values(), ids=CONFIGS.keys())
def test_bad_config_is_400_naming_the_problem(root, bare, base, change, words):
    apply_config(bare, change)
    with refused(400, *words):
        check(root, "a", base)


def test_rank_over_the_servers_limit(root, adapter, base):
    with refused(400, "rank 16", "limit of 8"):
        check(root, "a", base, max_rank=8)
    assert check(root, "a", base, max_rank=16).config["r"] == 16  # the limit is inclusive


# --- 11: adapter for another base -------------------------------------------------------------------


def test_manifest_of_another_base_is_409(root, adapter, base):
    edit_json(adapter / MANIFEST_FILE, base_model={"id": "meta-llama/Llama-3-8B", "fingerprint": "sha256:" + "0" * 32})
    with refused(409, "meta-llama/Llama-3-8B", base.fingerprint):
        check(root, "a", base)


def _wrong_shape(state):
    key = next(k for k in sorted(state) if ".q_proj.lora_A." in k)
    state[key] = torch.zeros(16, 256)  # a 256-wide model's q_proj: this base is 128 wide
    return "does not fit"


def _missing_module(state):
    state["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(16, 128)
    state["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(128, 16)
    return "layers.7"


def _not_lora(state):
    state["base_model.model.lm_head.weight"] = torch.zeros(1024, 128)
    return "not a LoRA"


def _dora_magnitude(state):
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight"] = torch.ones(128)
    return "not a LoRA"


def _rank_differs_from_config(state):
    for key in list(state):
        state[key] = state[key][:8] if ".lora_A." in key else state[key][:, :8]
    return "does not fit"


def _only_q_proj(state):
    for key in [k for k in state if ".q_proj." not in k]:
        del state[key]
    return "no weights for"


def _a_without_b(state):
    del state[next(k for k in sorted(state) if ".v_proj.lora_B." in k)]
    return "v_proj"


TENSOR_CASES = {
    f.__name__.strip("_"): f
    for f in (
        _wrong_shape,
        _missing_module,
        _not_lora,
        _dora_magnitude,
        _rank_differs_from_config,
        _only_q_proj,
        _a_without_b,
    )
}


@pytest.mark.parametrize("mutate", TENSOR_CASES.values(), ids=TENSOR_CASES.keys())
def test_tensors_that_do_not_fit_this_base_are_422(root, bare, base, mutate):
    state = tensors(bare)
    word = mutate(state)
    write_tensors(bare, state)
    with refused(422, word):
        check(root, "a", base)


@pytest.mark.parametrize(
    "targets,word",
    [
        (["q_proj"], "not in target_modules"),
        (["foo_proj"], "foo_proj"),
        (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"], "lm_head"),
    ],
)
def test_target_modules_that_disagree_with_the_tensors_are_422(root, bare, base, targets, word):
    """Otherwise the mismatch only surfaces inside PEFT on the model thread, as a 500."""
    edit_json(bare / CONFIG_FILE, target_modules=targets)
    with refused(422, word):
        check(root, "a", base)


def test_empty_safetensors_is_refused(root, bare, base):
    write_tensors(bare, {})
    with refused(400, "no tensors"):
        check(root, "a", base)


# --- 12: truncated or lying safetensors --------------------------------------------------------------

LIES = ["truncated", "header-10GB", "header-past-end", "offsets-past-end", "shape-1Tx1T", "empty-file", "garbage"]


@pytest.mark.parametrize("how", LIES)
def test_truncated_or_lying_safetensors_is_400_fast_and_small(root, bare, base, how):
    lying_safetensors(bare, how)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.monotonic()
    with refused(400, WEIGHTS_FILE):
        check(root, "a", base)
    assert time.monotonic() - started < 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024


# --- 13: size budget --------------------------------------------------------------------------------


def test_over_the_size_budget_is_413_before_the_weights_are_read(root, adapter, base, watch):
    size = (adapter / WEIGHTS_FILE).stat().st_size
    with watch() as opened, refused(413, str(size), "limit is 100"):
        check(root, "a", base, max_bytes=100)
    assert not touched(opened, adapter / WEIGHTS_FILE)
    assert check(root, "a", base, max_bytes=size).weights_bytes == size  # the budget is inclusive


# --- 17: a directory still being written -------------------------------------------------------------


def test_weights_missing_but_config_present(root, bare, base):
    (bare / WEIGHTS_FILE).unlink()
    with refused(400, WEIGHTS_FILE, "still being written"):
        check(root, "a", base)


def test_empty_dir_is_not_an_adapter(root, base):
    (root / "empty").mkdir()
    with refused(400, "not an adapter directory"):
        check(root, "empty", base)


@pytest.mark.parametrize("schema", [2, 0, "1", None, _DELETE], ids=["2", "0", "string", "null", "missing"])
def test_manifest_with_a_bad_schema_version(root, adapter, base, schema):
    edit_json(adapter / MANIFEST_FILE, schema_version=schema)
    with refused(400, "schema_version"):
        check(root, "a", base)


def test_unreadable_or_incomplete_manifest(root, adapter, base):
    (adapter / MANIFEST_FILE).write_text('{"schema_version": 1, "name": ')
    with refused(400, MANIFEST_FILE, "JSON"):
        check(root, "a", base)
    (adapter / MANIFEST_FILE).write_text('{"schema_version": 1, "name": "a"}')
    with refused(400, MANIFEST_FILE, "invalid"):
        check(root, "a", base)


def test_manifest_that_does_not_match_the_files(root, adapter, base):
    """New weights copied over an old adapter (old manifest still there): the version it names would lie."""
    state = tensors(adapter)
    key = first_key(adapter, "lora_B")
    state[key] = state[key] + 1
    write_tensors(adapter, state)
    with refused(400, MANIFEST_FILE, "do not match"):
        check(root, "a", base)


# --- 21: a load that fails inside the model leaves the model and the registry as they were -----------


def test_failed_attach_leaves_no_half_attached_adapter(tiny_model_dir, root, adapter, base, monkeypatch):
    """An out-of-memory half-way through laying out the device adapter slots (the first adapter, or one
    of a larger rank than those loaded) leaves the runner serving exactly as before, and a retry loads."""
    import server.engine.lora_slots as lora_slots
    from server.adapters.checks import lora_config
    from server.engine.runner import load_runner
    from tests.steps import prompt_logits

    runner = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False)
    checked = check(root, "a", base)
    config, weights = lora_config(checked), load_weights(checked)
    wider_config, wider_weights = widened(config, weights, extra=8)  # the same adapter as a higher-rank one
    real_zeros = torch.zeros

    def attach_failing_midway(key: str, config, weights) -> None:
        calls = []

        def oom_midway(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_zeros(*args, **kwargs)

        before = (set(runner.attached), runner.lora.rank)
        with monkeypatch.context() as mp:
            mp.setattr(lora_slots.torch, "zeros", oom_midway)
            with pytest.raises(torch.OutOfMemoryError):
                runner.attach(key, config, weights)
        assert len(calls) == 5  # it failed half-way through the new layout
        assert (set(runner.attached), runner.lora.rank) == before

    ids = runner.tokenizer("The capital of France is").input_ids
    attach_failing_midway("a0", config, weights)  # the first adapter on a bare model
    runner.attach("a1", config, weights)
    before = prompt_logits(runner, ids, "a1")
    attach_failing_midway("a2", wider_config, wider_weights)  # beside a live one
    assert runner.attached == {"a1"}
    # The same function, not always the same bits: a base weight that grew room for the wider shrink keeps it
    # (shrinking it back would allocate, mid out-of-memory), and a GEMM over more rows may block its sums
    # otherwise on some CPUs (seen: 3e-6 apart). A broken layout is off by far more.
    torch.testing.assert_close(prompt_logits(runner, ids, "a1"), before)
    runner.attach("a2", wider_config, wider_weights)  # and the same key loads on retry
    assert runner.attached == {"a1", "a2"}
    torch.testing.assert_close(prompt_logits(runner, ids, "a2"), before)  # zero-padded rank: the same function
    torch.testing.assert_close(prompt_logits(runner, ids, "a1"), before)


def widened(config, weights: dict, *, extra: int):
    """`config`/`weights` as a rank r+extra adapter computing the same function (zero rows/columns)."""
    import dataclasses

    wider = {}
    for key, tensor in weights.items():
        pad = (0, 0, 0, extra) if ".lora_A." in key else (0, extra)  # A: [r, in] more rows; B: [out, r] more columns
        wider[key] = torch.nn.functional.pad(tensor, pad)
    scale = config.lora_alpha / config.r
    return dataclasses.replace(config, r=config.r + extra, lora_alpha=scale * (config.r + extra)), wider


def test_base_rows_stay_base_after_the_first_hot_load(tiny_model_dir, root, adapter, base):
    """A server that ran base-model rows, then hot-loads its first adapter: base rows must not get it."""
    from server.adapters.checks import lora_config
    from server.engine.runner import load_runner
    from tests.steps import prompt_logits

    runner = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False)
    checked = check(root, "a", base)
    ids = runner.tokenizer("The capital of France is").input_ids
    plain = prompt_logits(runner, ids)
    runner.attach("x", lora_config(checked), load_weights(checked))
    torch.testing.assert_close(prompt_logits(runner, ids), plain, rtol=0, atol=0)
    assert not torch.allclose(prompt_logits(runner, ids, "x"), plain)  # the adapter does change the answer
    torch.testing.assert_close(prompt_logits(runner, ids), plain, rtol=0, atol=0)
    runner.detach("x")
    torch.testing.assert_close(prompt_logits(runner, ids), plain, rtol=0, atol=0)


def test_registry_keeps_the_old_version_when_attach_fails(root, adapter, base, trained_adapters):
    from contract.templates import BUILTIN
    from server.adapters.registry import AdapterRegistry

    copy_adapter(trained_adapters.zh, root / "b")
    attached, detached = [], []

    def attach(key, config, weights):
        if key.endswith("__2"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        attached.append(key)

    async def on_worker(fn):
        return fn()

    registry = AdapterRegistry(
        root=root,
        base=base,
        base_name="tiny",
        default_template=BUILTIN["alpaca"],
        max_adapters=4,
        max_rank=64,
        max_bytes=BIG,
        run_on_worker=on_worker,
        attach=attach,
        detach=detached.append,
    )

    async def scenario():
        first = await registry.load("x", "a")
        with pytest.raises(torch.OutOfMemoryError):
            await registry.load("x", "b")
        return first

    first = asyncio.run(scenario())
    assert registry.names() == ["x"]
    assert registry.get("x") is first and registry.get("x").path == "a" and not first.retired
    assert attached == [first.key] and detached == []


# --- live: one server for the HTTP side ---------------------------------------------------------------


@pytest.fixture(scope="module")
def live_dirs(tmp_path_factory, trained_adapters):
    top = tmp_path_factory.mktemp("live")
    root = top / "root"
    root.mkdir()
    copy_adapter(trained_adapters.en, root / "en")
    copy_adapter(trained_adapters.zh, root / "zh")
    copy_adapter(trained_adapters.en, top / "outside")
    return root, top / "outside"


@pytest.fixture(scope="module")
def server(tiny_model_dir, live_dirs, trained_adapters):
    root, _ = live_dirs
    size = (trained_adapters.en / WEIGHTS_FILE).stat().st_size
    with LiveServer(tiny_model_dir, root, api_keys=API_KEYS, max_adapter_rank=16, max_adapter_bytes=3 * size) as live:
        yield live


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200, server.log()[-3000:]


@pytest.fixture
def live_root(live_dirs):
    return live_dirs[0]


def listed(client) -> dict[str, str]:
    resp = client.get("/adapters", headers=KEY)
    assert resp.status_code == 200, resp.text
    names = [a["name"] for a in resp.json()]
    assert len(names) == len(set(names)), names
    return {a["name"]: a["version"] for a in resp.json()}


def load(client, server, name: str, path: str) -> httpx.Response:
    return client.post("/admin/adapters", json={"name": name, "path": path}, headers=server.admin_headers())


def assert_refused(client, server, path: str, status: int, *words: str, name: str = "evil") -> dict:
    before = listed(client)
    resp = load(client, server, name, path)
    assert resp.status_code == status, resp.text
    body = resp.json()
    for word in words:
        assert word.lower() in body["error"].lower(), body
    assert body["param"] == "path", body
    assert client.get(f"/adapters/{name}", headers=KEY).status_code == 404
    assert listed(client) == before
    return body


def fresh(live_root: Path, src: Path, name: str, **kw) -> Path:
    dest = live_root / name
    shutil.rmtree(dest, ignore_errors=True)
    return copy_adapter(src, dest, **kw)


LIVE_ESCAPES = {
    "absolute-outside": ("{outside}", 400),
    "dotdot": ("../outside", 400),
    "inner-dotdot": ("en/../../outside", 400),
    "percent-encoded": ("%2e%2e/outside", 400),
    "backslashes": ("..\\outside", 400),
    "nul": ("en\x00", 400),
    "tilde": ("~/outside", 400),
    "dir-link": ("link-out", 403),
    "weights-link": ("weights-link", 403),
}


@pytest.mark.parametrize("rel,status", LIVE_ESCAPES.values(), ids=LIVE_ESCAPES.keys())
def test_live_path_escapes(client, server, live_dirs, trained_adapters, rel, status):
    root, outside = live_dirs
    if not (root / "link-out").is_symlink():
        (root / "link-out").symlink_to(outside, target_is_directory=True)
    if not (root / "weights-link").exists():
        copy_adapter(trained_adapters.en, root / "weights-link")
        (root / "weights-link" / WEIGHTS_FILE).unlink()
        (root / "weights-link" / WEIGHTS_FILE).symlink_to(outside / WEIGHTS_FILE)
    assert_refused(client, server, rel.format(outside=outside), status, "path" if status == 400 else "root")


def test_live_pickle_only_runs_no_code(client, server, live_root, trained_adapters, tmp_path):
    canary = tmp_path / "canary"
    d = fresh(live_root, trained_adapters.en, "pickled", manifest=False)
    (d / WEIGHTS_FILE).unlink()
    evil_pickle(d / "adapter_model.bin", canary)
    assert_refused(client, server, "pickled", 400, "pickle", "safetensors")
    assert not canary.exists()


LIVE_CONFIGS = {
    k: CONFIGS[k] for k in ("not-json", "r-string", "use-dora", "modules-to-save", "bias-all", "prefix-tuning")
}


@pytest.mark.parametrize("change,words", LIVE_CONFIGS.values(), ids=LIVE_CONFIGS.keys())
def test_live_bad_config(client, server, live_root, trained_adapters, change, words):
    apply_config(fresh(live_root, trained_adapters.en, "badcfg", manifest=False), change)
    assert_refused(client, server, "badcfg", 400, *words)


def test_live_rank_over_the_servers_limit(client, server, live_root, trained_adapters):
    with_rank(fresh(live_root, trained_adapters.en, "rank32"), 32)  # 2x the bytes: under the 3x budget
    assert_refused(client, server, "rank32", 400, "rank 32", "limit of 16")


def test_live_over_the_size_budget_is_413(client, server, live_root, trained_adapters):
    with_rank(fresh(live_root, trained_adapters.en, "rank64"), 64)  # 4x the bytes: over the 3x budget
    assert_refused(client, server, "rank64", 413, "limit")


def test_live_other_base_409(client, server, live_root, trained_adapters):
    d = fresh(live_root, trained_adapters.en, "otherbase")
    edit_json(d / MANIFEST_FILE, base_model={"id": "other/model", "fingerprint": "sha256:" + "1" * 32})
    assert_refused(client, server, "otherbase", 409, "other/model")


@pytest.mark.parametrize(
    "mutate",
    [_wrong_shape, _missing_module, _not_lora, _only_q_proj],
    ids=["wrong-shape", "missing-module", "not-lora", "only-q-proj"],
)
def test_live_tensors_that_do_not_fit_422(client, server, live_root, trained_adapters, mutate):
    d = fresh(live_root, trained_adapters.en, "misfit", manifest=False)
    state = tensors(d)
    word = mutate(state)
    write_tensors(d, state)
    assert_refused(client, server, "misfit", 422, word)


def test_live_targets_disagreeing_with_tensors_is_422_not_500(client, server, live_root, trained_adapters):
    d = fresh(live_root, trained_adapters.en, "targets", manifest=False)
    edit_json(d / CONFIG_FILE, target_modules=["q_proj", "v_proj"])
    assert_refused(client, server, "targets", 422, "target_modules")


@pytest.mark.parametrize("how", ["truncated", "header-10GB", "offsets-past-end"])
def test_live_lying_safetensors_400_fast(client, server, live_root, trained_adapters, how):
    lying_safetensors(fresh(live_root, trained_adapters.en, "lying", manifest=False), how)
    started = time.monotonic()
    assert_refused(client, server, "lying", 400, "safetensors")
    assert time.monotonic() - started < 3


def test_live_dir_still_being_written(client, server, live_root, trained_adapters):
    d = fresh(live_root, trained_adapters.en, "partial", manifest=False)
    (d / WEIGHTS_FILE).unlink()
    assert_refused(client, server, "partial", 400, "still being written")
    d = fresh(live_root, trained_adapters.en, "schema")
    edit_json(d / MANIFEST_FILE, schema_version=99)
    assert_refused(client, server, "schema", 400, "schema_version")


def test_live_bad_names_and_missing_dirs(client, server):
    assert load(client, server, "../x", "en").status_code == 422
    assert load(client, server, "", "en").status_code == 422
    assert (
        client.post(
            "/admin/adapters", json={"name": "x", "path": "en", "extra": 1}, headers=server.admin_headers()
        ).status_code
        == 422
    )
    assert_refused(client, server, "no-such-dir", 404, "no adapter directory")


# --- 14 / 15 / 16: reloads, concurrent loads, unload under load --------------------------------------


def generate(client, name: str, **parameters) -> httpx.Response:
    return client.post(
        "/generate",
        headers=KEY,
        json={
            "inputs": "The capital of France is",
            "parameters": {"adapter_id": name, "max_new_tokens": 4, "details": True, **parameters},
        },
    )


BROKEN_RELOADS = {
    "bad-config": (lambda d: edit_json(d / CONFIG_FILE, r="16"), 400),
    "other-base": (lambda d: edit_json(d / MANIFEST_FILE, base_model={"id": "x", "fingerprint": "sha256:2"}), 409),
    "pickle-only": (lambda d: ((d / WEIGHTS_FILE).unlink(), torch.save({}, d / "adapter_model.bin")), 400),
    "truncated": (lambda d: lying_safetensors(d, "truncated"), 400),
    "wrong-targets": (
        lambda d: ((d / MANIFEST_FILE).unlink(), edit_json(d / CONFIG_FILE, target_modules=["q_proj"])),
        422,
    ),
}


@pytest.mark.parametrize("breakage,status", BROKEN_RELOADS.values(), ids=BROKEN_RELOADS.keys())
def test_live_failed_reload_keeps_the_old_version(client, server, live_root, trained_adapters, breakage, status):
    first = load(client, server, "keep", "en")
    assert first.status_code == 200, first.text
    old = first.json()["version"]
    d = fresh(live_root, trained_adapters.zh, "broken")
    breakage(d)
    resp = load(client, server, "keep", "broken")
    assert resp.status_code == status, resp.text
    info = client.get("/adapters/keep", headers=KEY).json()
    assert (info["version"], info["path"]) == (old, "en")
    out = generate(client, "keep")
    assert out.status_code == 200, out.text
    assert out.json()["details"]["adapter_version"] == old


def test_live_reload_swaps_the_version(client, server):
    en = load(client, server, "swap", "en").json()["version"]
    zh = load(client, server, "swap", "zh")
    assert zh.status_code == 200 and zh.json()["version"] != en
    assert generate(client, "swap").json()["details"]["adapter_version"] == zh.json()["version"]
    assert listed(client)["swap"] == zh.json()["version"]


def test_live_concurrent_loads_of_one_name(server, client):
    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            return await asyncio.gather(
                *[
                    ac.post(
                        "/admin/adapters",
                        json={"name": "conc", "path": ["en", "zh"][i % 2]},
                        headers=server.admin_headers(),
                    )
                    for i in range(5)
                ]
            )

    responses = asyncio.run(fire())
    assert all(r.status_code in (200, 409) for r in responses), [r.text for r in responses]
    ok = [r.json()["version"] for r in responses if r.status_code == 200]
    assert ok
    versions = listed(client)
    assert versions["conc"] in ok
    out = generate(client, "conc")
    assert out.status_code == 200 and out.json()["details"]["adapter_version"] == versions["conc"]
    metrics = client.get("/metrics").text
    assert "loraserve_adapters_loaded " + f"{float(len(versions))}" in metrics


def test_live_unload_while_streams_run(server, client):
    """Three greedy streams on the adapter (three prompts, so an early EOS in one cannot void the test);
    the unload answers at once, new requests get 404, the running streams finish on the old version."""
    assert load(client, server, "busy", "en").status_code == 200
    version = listed(client)["busy"]
    prompts = [
        "0 1 2 3 4 5 6 7 8 9 " * 4,
        "The quick brown fox jumps over the lazy dog. " * 3,
        "Zebra yacht quartz " * 5,
    ]

    async def scenario():
        streams: list[list[tuple[float, dict]]] = [[] for _ in prompts]
        async with httpx.AsyncClient(base_url=server.url, timeout=120, headers=KEY) as ac:
            started = asyncio.Event()

            async def read(prompt: str, arrivals: list) -> int:
                body = {"inputs": prompt, "parameters": {"adapter_id": "busy", "max_new_tokens": 64}}
                async with ac.stream("POST", "/generate_stream", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data:"):
                            arrivals.append((time.monotonic(), json.loads(line[5:])))
                            started.set()
                    return resp.status_code

            readers = [asyncio.create_task(read(p, a)) for p, a in zip(prompts, streams)]
            await asyncio.wait_for(started.wait(), 30)
            gone = await ac.delete("/admin/adapters/busy", headers=server.admin_headers())
            deleted_at = time.monotonic()
            after = await ac.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "busy"}})
            listing = await ac.get("/adapters/busy")
            codes = await asyncio.wait_for(asyncio.gather(*readers), 120)
        return gone, deleted_at, after, listing, codes, streams

    gone, deleted_at, after, listing, codes, streams = asyncio.run(scenario())
    assert gone.status_code == 200 and gone.json()["version"] == version
    assert after.status_code == 404 and listing.status_code == 404
    assert codes == [200] * len(prompts)
    assert [e for arrivals in streams for at, e in arrivals if at > deleted_at], "all streams ended before the unload"
    for arrivals in streams:
        final = arrivals[-1][1]
        assert "error" not in final and isinstance(final["generated_text"], str), final
        assert final["details"]["adapter_version"] == version
        assert final["details"]["generated_tokens"] == len(arrivals)
    assert "busy" not in listed(client)
    assert load(client, server, "busy", "zh").status_code == 200  # the name is free again


# --- 23: admin token and API keys ---------------------------------------------------------------------


def test_live_admin_token(client, server):
    body = {"name": "auth", "path": "en"}
    missing = client.post("/admin/adapters", json=body)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert (
        client.post("/admin/adapters", json=body, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}).status_code == 401
    )
    for token in ("wrong", ADMIN_TOKEN[:-1] + chr(ord(ADMIN_TOKEN[-1]) + 1), ADMIN_TOKEN + "x", ADMIN_TOKEN[:-1], "k2"):
        assert client.post("/admin/adapters", json=body, headers=server.admin_headers(token)).status_code == 403, token
    assert client.post("/admin/adapters", json=body, headers={"Authorization": b"Bearer \xff\xfe"}).status_code == 403
    assert client.delete("/admin/adapters/en", headers=server.admin_headers("wrong")).status_code == 403
    assert "auth" not in listed(client)
    assert load(client, server, "auth", "en").status_code == 200


def test_admin_api_is_off_without_a_token():
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.settings import ServerSettings

    for token in (None, ""):
        app = create_app(ServerSettings(base_model="/nonexistent", admin_token=token), load=False)
        with TestClient(app) as tc:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
                resp = tc.post("/admin/adapters", json={"name": "x", "path": "en"}, headers=headers)
                assert resp.status_code == 403 and "disabled" in resp.json()["error"], resp.text
            assert tc.delete("/admin/adapters/x", headers={"Authorization": "Bearer x"}).status_code == 403


def test_live_api_keys(client, server):
    req = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 2}}
    missing = client.post("/generate", json=req)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for token in ("k3", "k", "k22", ADMIN_TOKEN):
        assert client.post("/generate", json=req, headers={"Authorization": f"Bearer {token}"}).status_code == 401, (
            token
        )
    assert client.get("/adapters").status_code == 401
    for key in API_KEYS:
        ok = client.post("/generate", json=req, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and isinstance(ok.json()["generated_text"], str)
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("wiring", ["attach", "server"])
def test_lora_on_a_module_the_engine_does_not_serve_is_400(tiny_model_dir, root, adapter, base, wiring):
    """A valid PEFT adapter that also trains lm_head passes the file checks (the base has that module),
    but the engine applies LoRA to the seven projections only: the load is a clear 400, never a 500
    and never served without its lm_head part. Whether the runner refuses it on the worker (`attach`) or in
    the load's reading thread (the server's wiring: the host copy is made with the read), and in the engine
    process's attach job."""
    from contract.templates import BUILTIN
    from server.adapters.checks import lora_config
    from server.adapters.registry import AdapterRegistry
    from server.engine.runner import load_runner
    from server.engine_process import child
    from server.state import adapter_io

    runner = load_runner(str(tiny_model_dir), backend="transformers", load_in_4bit=False)
    d = copy_adapter(adapter, root / "with-head", manifest=False)
    state = tensors(d)
    rank = next(v.shape[0] for k, v in state.items() if ".lora_A." in k)
    hidden, vocab = base.linear["lm_head"]
    state["base_model.model.lm_head.lora_A.weight"] = torch.zeros(rank, hidden)
    state["base_model.model.lm_head.lora_B.weight"] = torch.zeros(vocab, rank)
    write_tensors(d, state)
    edit_json(
        d / "adapter_config.json",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
    )

    async def on_worker(fn):
        return fn()

    read, keep = adapter_io(runner) if wiring == "server" else (load_weights, runner.attach)
    registry = AdapterRegistry(
        root=root,
        base=base,
        base_name="tiny",
        default_template=BUILTIN["alpaca"],
        max_adapters=4,
        max_rank=64,
        max_bytes=BIG,
        run_on_worker=on_worker,
        attach=keep,
        detach=runner.detach,
        read_weights=read,
    )
    with pytest.raises(BadRequest) as error:
        asyncio.run(registry.load("head", "with-head"))
    assert "lm_head" in str(error.value) and "servable" in str(error.value)
    assert registry.names() == [] and runner.attached == set()
    checked = check(root, "with-head", base)
    files = child.AdapterFiles(str(checked.path), checked.sha256)
    with pytest.raises(ValueError, match="servable"):  # the job fails with it: the server raises it as above
        child._job(None, runner, "attach", ("head", lora_config(checked), files))


def test_a_failed_detach_is_retried_by_the_next_collect(root, adapter, base):
    """The unload succeeds for its caller (nothing reaches the adapter any more); a detach that fails is
    logged and retried by the next collect, and does not hold back the others retired beside it."""
    from contract.templates import BUILTIN
    from server.adapters.registry import AdapterRegistry

    detached, failures = [], {"left": 1}

    def detach(key):
        if failures["left"] and key.startswith("x__"):
            failures["left"] -= 1
            raise RuntimeError("detach failed (simulated)")
        detached.append(key)

    async def on_worker(fn):
        return fn()

    registry = AdapterRegistry(
        root=root,
        base=base,
        base_name="tiny",
        default_template=BUILTIN["alpaca"],
        max_adapters=4,
        max_rank=64,
        max_bytes=BIG,
        run_on_worker=on_worker,
        attach=lambda *args: None,
        detach=detach,
    )

    async def scenario():
        x, y = await registry.load("x", "a"), await registry.load("y", "a")
        for version in (x, y):  # held by a request, so both are retired and wait for one collect together
            version.refs += 1
        await registry.unload("x")
        await registry.unload("y")
        x.refs -= 1
        y.refs -= 1
        await registry.collect()  # x's detach fails; y's goes through all the same
        first = list(detached)
        await registry.collect()
        return x, y, first

    x, y, first = asyncio.run(scenario())
    assert first == [y.key] and detached == [y.key, x.key]


def test_a_load_cancelled_while_its_attach_runs_leaves_nothing_attached(root, adapter, base):
    """The worker runs a queued attach even when the load awaiting it is cancelled (shutdown, a client
    gone): that attachment is never published, so it must be detached, not left holding memory."""
    from contract.templates import BUILTIN
    from server.adapters.registry import AdapterRegistry

    attached, detached = [], []

    async def scenario():
        jobs, queued, release = [], asyncio.Event(), asyncio.Event()

        async def on_worker(fn):  # as Engine.call: the job is queued for the worker, whatever the caller does
            future = asyncio.get_running_loop().create_future()
            jobs.append((fn, future))
            queued.set()
            return await future

        async def worker():
            await release.wait()
            while not detached:
                while jobs:
                    fn, future = jobs.pop(0)
                    result = fn()
                    if not future.cancelled():
                        future.set_result(result)
                await asyncio.sleep(0)

        registry = AdapterRegistry(
            root=root,
            base=base,
            base_name="tiny",
            default_template=BUILTIN["alpaca"],
            max_adapters=4,
            max_rank=64,
            max_bytes=BIG,
            run_on_worker=on_worker,
            attach=lambda key, *args: attached.append(key),
            detach=detached.append,
        )
        load = asyncio.ensure_future(registry.load("x", "a"))
        await queued.wait()
        load.cancel()
        await asyncio.gather(load, return_exceptions=True)
        release.set()
        await asyncio.wait_for(worker(), 10)  # ends once something was detached
        return registry

    registry = asyncio.run(scenario())
    assert registry.names() == [] and attached and detached == attached
