"""The adapter manifest: `loraserve.json`, written next to the PEFT files, last.

Training writes it after the weights, inside a temp dir that is renamed into place, so a directory
with a manifest is complete. The server reads it for the template, stop strings and the base model
fingerprint it must match. `version` is a hash of the adapter's own files, so two loads of the same
bytes share a version and a retrained adapter gets a new one.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contract.lora import CONFIG_FILE, WEIGHTS_FILE

MANIFEST_FILE = "loraserve.json"
SCHEMA_VERSION = 1
# The files whose bytes define an adapter; the manifest itself is excluded (it names the hash).
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of an unknown schema."""


class BaseModelInfo(BaseModel):
    id: str
    fingerprint: str


class TemplateInfo(BaseModel):
    name: str
    text: str


class LoraInfo(BaseModel):
    r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: list[str]


class DatasetInfo(BaseModel):
    source: str
    sha256: str
    rows: int
    rows_kept: int
    rows_over_length: int = 0


class LossInfo(BaseModel):
    final: float | None = None
    curve: list[tuple[int, float]] = Field(default_factory=list)


class AdapterManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    name: str
    version: str = ""
    adapter_sha256: str = ""
    base_model: BaseModelInfo
    template: TemplateInfo
    eos_token: str
    stop: list[str] = Field(default_factory=list)
    lora: LoraInfo
    training: dict[str, Any] = Field(default_factory=dict)
    dataset: DatasetInfo | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    loss: LossInfo = Field(default_factory=LossInfo)
    backend: str = ""
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def summary(self) -> dict[str, Any]:
        """What a public listing shows: enough to recognise the adapter (the base id is as given at training)."""
        return {
            "template": self.template.name,
            "base_model": _public_model_id(self.base_model.id),
            "created_at": self.created_at,
            "final_loss": self.loss.final,
            "steps": self.training.get("steps_trained", self.training.get("max_steps")),  # older manifests: as asked
            "dataset_rows": self.dataset.rows_kept if self.dataset else None,
            "backend": self.backend,
        }


def _public_model_id(model_id: str) -> str:
    """A hub id as given; a local path by its last part only: a public listing must not show the
    directories of the machine that trained the adapter."""
    return Path(model_id).name if Path(model_id).is_absolute() else model_id


def adapter_sha256(adapter_dir: str | Path) -> str:
    return _sha256_of_files((name, _chunks(Path(adapter_dir) / name)) for name in ADAPTER_FILES)


def adapter_bytes_sha256(contents: dict[str, bytes]) -> str:
    """adapter_sha256 of the adapter's files as already read: contents[name] for each of ADAPTER_FILES."""
    return _sha256_of_files((name, [contents[name]]) for name in ADAPTER_FILES)


def _sha256_of_files(files) -> str:
    """The hash of (name, chunks of its bytes) pairs, in order: each name, then its bytes."""
    digest = hashlib.sha256()
    for name, chunks in files:
        digest.update(name.encode())
        for chunk in chunks:
            digest.update(chunk)
    return digest.hexdigest()


def _chunks(path: Path):
    with open(path, "rb") as fh:
        yield from iter(lambda: fh.read(1 << 20), b"")


def write_manifest(adapter_dir: str | Path, manifest: AdapterManifest) -> AdapterManifest:
    """Stamp the content hash and write the manifest; call after the adapter files are complete."""
    sha = adapter_sha256(adapter_dir)
    stamped = manifest.model_copy(update={"adapter_sha256": sha, "version": sha[:12]})
    path = Path(adapter_dir) / MANIFEST_FILE
    path.write_text(json.dumps(stamped.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n", "utf-8")
    return stamped


def read_manifest(adapter_dir: str | Path) -> AdapterManifest | None:
    """The adapter's manifest, or None when it has none. Raises ManifestError when it is unusable."""
    path = Path(adapter_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{MANIFEST_FILE} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        found = data.get("schema_version") if isinstance(data, dict) else None
        raise ManifestError(f"{MANIFEST_FILE} has schema_version {found!r}; this loraserve reads {SCHEMA_VERSION}")
    try:
        return AdapterManifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{MANIFEST_FILE} is invalid: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from exc
