"""Checks on an adapter directory before any model work: where it is, what it holds, whether it fits.

Everything here reads files and headers only. Nothing unpickles, nothing touches the GPU, and the
weights are read (onto the CPU) only after their size and shapes passed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from contract.lora import (
    CONFIG_FILE,
    PICKLE_SUFFIXES,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterConfigError,
    is_targeted,
    parse_lora_key,
)
from contract.manifest import MANIFEST_FILE, AdapterManifest, ManifestError, adapter_sha256, read_manifest
from server.errors import BadRequest, Conflict, Forbidden, Invalid, NotFound, PayloadTooLarge

MAX_CONFIG_BYTES = 64 * 1024


@dataclass
class BaseShapes:
    """What the base model offers to LoRA: module path → (in_features, out_features)."""

    fingerprint: str
    linear: dict[str, tuple[int, int]]


@dataclass
class CheckedAdapter:
    path: Path
    config: dict  # adapter_config.json as read
    lora: AdapterConfig  # what of it the runner applies
    manifest: AdapterManifest | None
    weights_bytes: int
    sha256: str  # of the adapter's own files: the version when there is no manifest


def resolve_under_root(root: Path, relative: str) -> Path:
    """The adapter dir for `relative`, which must stay inside `root` after resolving symlinks."""
    if not relative or len(relative) > 512 or any(c in relative for c in ("\x00", "\\", "%", "~")):
        raise BadRequest("path must be a plain relative path under the adapter root", param="path")
    candidate = Path(relative)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise BadRequest("path must be relative to the adapter root, without '..'", param="path")
    root = root.resolve()
    try:
        resolved = (root / candidate).resolve()
        is_dir = resolved.is_relative_to(root) and resolved.is_dir()
    except OSError as exc:  # a component over the file system's name limit, a link loop: the client's path
        # strerror only: the exception's own text names the server-side directory
        raise BadRequest(f"path cannot be opened: {exc.strerror or type(exc).__name__}", param="path") from exc
    if not resolved.is_relative_to(root):
        raise Forbidden("path leaves the adapter root", param="path")
    if not is_dir:
        raise NotFound(f"no adapter directory at {relative!r} under the adapter root", param="path")
    return resolved


def check_adapter_dir(path: Path, root: Path, base: BaseShapes, *, max_rank: int, max_bytes: int) -> CheckedAdapter:
    weights = _inside_root(path / WEIGHTS_FILE, root)
    config_path = _inside_root(path / CONFIG_FILE, root)
    manifest_path = _inside_root(path / MANIFEST_FILE, root)  # a link out could be /dev/zero or a secret
    if not weights.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise BadRequest(f"only safetensors adapters are loaded; found pickle files {pickles}", param="path")
        if not manifest_path.exists() and not config_path.is_file():
            raise BadRequest(f"not an adapter directory (no {CONFIG_FILE}, no weights)", param="path")
        raise BadRequest(f"{WEIGHTS_FILE} is missing (a directory still being written?)", param="path")
    size = weights.stat().st_size
    if size > max_bytes:
        raise PayloadTooLarge(f"adapter weights are {size} bytes; the limit is {max_bytes}", param="path")
    config = _read_config(config_path)
    lora = _lora_config(config, max_rank=max_rank)
    manifest = _read_manifest(path)
    if manifest is not None and manifest.base_model.fingerprint != base.fingerprint:
        raise Conflict(
            f"adapter was trained for base {manifest.base_model.id!r} (fingerprint {manifest.base_model.fingerprint}); "
            f"this server runs fingerprint {base.fingerprint}",
            param="path",
        )
    sha = adapter_sha256(path)  # hashed once: checked against the manifest, or the version without one
    if manifest is not None and manifest.adapter_sha256 and sha != manifest.adapter_sha256:
        # The manifest is written last: files that no longer hash to it were changed or are still being
        # copied in, and the version it names would be a lie.
        raise BadRequest(
            f"the adapter files do not match {MANIFEST_FILE} (adapter_sha256): changed after "
            "training, or still being written",
            param="path",
        )
    _check_weight_shapes(weights, lora, base)
    return CheckedAdapter(path=path, config=config, lora=lora, manifest=manifest, weights_bytes=size, sha256=sha)


def load_weights(checked: CheckedAdapter) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checked.path / WEIGHTS_FILE), device="cpu")


def lora_config(checked: CheckedAdapter) -> AdapterConfig:
    """The LoRA settings the runner attaches the weights with (rank, scaling)."""
    return checked.lora


def _inside_root(path: Path, root: Path) -> Path:
    if path.is_symlink() or path.exists():
        resolved = path.resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise Forbidden(f"{path.name} is a link leaving the adapter root", param="path")
        return resolved
    return path


def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise BadRequest(f"{CONFIG_FILE} is missing", param="path")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BadRequest(f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes", param="path")
    try:
        config = json.loads(path.read_text("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"{CONFIG_FILE} is not valid JSON: {exc}", param="path") from exc
    if not isinstance(config, dict):
        raise BadRequest(f"{CONFIG_FILE} must hold a JSON object", param="path")
    return config


def _lora_config(config: dict, *, max_rank: int) -> AdapterConfig:
    try:
        lora = AdapterConfig.from_json(config)
    except AdapterConfigError as exc:
        raise BadRequest(str(exc), param="path") from exc
    if lora.r > max_rank:
        raise BadRequest(f"{CONFIG_FILE}: rank {lora.r} is over this server's limit of {max_rank}", param="path")
    return lora


def _check_weight_shapes(weights: Path, lora: AdapterConfig, base: BaseShapes) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated or lying headers
        raise BadRequest(f"{WEIGHTS_FILE} is not a valid safetensors file: {exc}", param="path") from exc
    if not shapes:
        raise BadRequest(f"{WEIGHTS_FILE} holds no tensors", param="path")
    found: dict[str, set[str]] = {}
    for key, shape in shapes.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            raise Invalid(f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA A/B weight", param="path")
        if parsed.module not in base.linear:
            raise Invalid(f"adapter targets {parsed.module!r}, which this base model does not have", param="path")
        _check_shape(key, shape, parsed.part, base.linear[parsed.module], lora.r)
        found.setdefault(parsed.module, set()).add(parsed.part)
    _check_coverage(found, list(lora.target_modules), base)


def _check_coverage(found: dict[str, set[str]], targets: list[str], base: BaseShapes) -> None:
    """The tensors must be exactly the A and B of every module target_modules selects (PEFT's suffix
    match); otherwise PEFT fails on the model thread, or leaves modules at their random init."""
    targeted = {m for m in base.linear if is_targeted(m, targets)}
    if not targeted:
        raise Invalid(f"target_modules {targets} match no module of this base model", param="path")
    extra = sorted(set(found) - targeted)
    if extra:
        raise Invalid(
            f"{WEIGHTS_FILE} has weights for {extra[0]!r}, which is not in target_modules {targets}", param="path"
        )
    incomplete = sorted(m for m in targeted if found.get(m) != {"A", "B"})
    if incomplete:
        raise Invalid(
            f"{WEIGHTS_FILE} has no weights for {incomplete[0]!r} (lora_A and lora_B), which "
            f"target_modules {targets} selects",
            param="path",
        )


def _check_shape(key: str, shape: tuple, part: str, in_out: tuple[int, int], r: int) -> None:
    in_features, out_features = in_out
    expected = (r, in_features) if part == "A" else (out_features, r)
    if shape != expected:
        raise Invalid(
            f"{key}: shape {list(shape)} does not fit this base model (expected {list(expected)})", param="path"
        )


def _read_manifest(path: Path) -> AdapterManifest | None:
    try:
        return read_manifest(path)
    except ManifestError as exc:
        raise BadRequest(str(exc), param="path") from exc


def base_shapes(model, fingerprint: str) -> BaseShapes:
    """Module paths of every Linear-like layer LoRA could target (4-bit layers included)."""
    linear = {}
    for name, module in model.named_modules():
        base_layer = getattr(module, "base_layer", module)
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features") and ".lora_" not in name:
            linear[name.removesuffix(".base_layer")] = (int(base_layer.in_features), int(base_layer.out_features))
    return BaseShapes(fingerprint=fingerprint, linear=linear)
