"""The adapter manifest (write, read, version from the files' bytes) and the base model fingerprint."""

from __future__ import annotations

import hashlib
import json

import pytest

from contract.fingerprint import base_fingerprint
from contract.manifest import (
    ADAPTER_FILES,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    AdapterManifest,
    BaseModelInfo,
    DatasetInfo,
    LoraInfo,
    LossInfo,
    ManifestError,
    TemplateInfo,
    adapter_sha256,
    read_manifest,
    write_manifest,
)
from contract.templates import ALPACA_ZH


def make_manifest(**overrides) -> AdapterManifest:
    fields = dict(
        name="facts-zh",
        base_model=BaseModelInfo(id="/models/tiny", fingerprint="sha256:" + "ab" * 16),
        template=TemplateInfo(name=ALPACA_ZH.name, text=ALPACA_ZH.text),
        eos_token="</s>",
        stop=["</s>"],
        lora=LoraInfo(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        training={"max_steps": 200, "lr": 0.01},
        dataset=DatasetInfo(source="facts_zh.jsonl", sha256="cd" * 32, rows=16, rows_kept=16),
        versions={"torch": "2.13.0"},
        loss=LossInfo(final=0.08, curve=[(1, 7.4), (2, 3.1)]),
        backend="transformers",
    )
    return AdapterManifest(**(fields | overrides))


@pytest.fixture
def adapter_dir(tmp_path):
    """A dir with the adapter files a manifest hashes (their content is opaque to the manifest)."""
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00weights\x01" * 100)
    return tmp_path


def write_raw(adapter_dir, data) -> None:
    (adapter_dir / MANIFEST_FILE).write_text(data if isinstance(data, str) else json.dumps(data), "utf-8")


# --- write / read ----------------------------------------------------------------------------------


def test_round_trip(adapter_dir):
    written = write_manifest(adapter_dir, make_manifest())
    read = read_manifest(adapter_dir)
    assert read == written
    assert read.template.text == ALPACA_ZH.text  # Chinese survives the file unescaped
    assert ALPACA_ZH.text.splitlines()[0] in (adapter_dir / MANIFEST_FILE).read_text("utf-8")
    assert read.loss.curve == [(1, 7.4), (2, 3.1)]
    assert read.schema_version == SCHEMA_VERSION


def test_version_is_the_first_12_hex_of_the_files_hash(adapter_dir):
    written = write_manifest(adapter_dir, make_manifest(version="stale", adapter_sha256="stale"))
    expected = hashlib.sha256()
    for name in ADAPTER_FILES:
        expected.update(name.encode())
        expected.update((adapter_dir / name).read_bytes())
    assert written.adapter_sha256 == adapter_sha256(adapter_dir) == expected.hexdigest()
    assert written.version == written.adapter_sha256[:12]


def test_version_changes_when_the_weights_change(adapter_dir):
    before = write_manifest(adapter_dir, make_manifest()).version
    weights = adapter_dir / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x02")
    after = write_manifest(adapter_dir, make_manifest()).version
    assert after != before
    assert read_manifest(adapter_dir).version == after


def test_version_changes_when_the_adapter_config_changes(adapter_dir):
    before = write_manifest(adapter_dir, make_manifest()).version
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    assert write_manifest(adapter_dir, make_manifest()).version != before


def test_version_ignores_the_manifest_itself(adapter_dir):
    first = write_manifest(adapter_dir, make_manifest(name="one", training={"max_steps": 1}))
    second = write_manifest(adapter_dir, make_manifest(name="two", training={"max_steps": 2}))
    assert first.version == second.version


def test_extra_fields_survive(adapter_dir):
    write_manifest(adapter_dir, make_manifest(notes="from a newer writer"))
    assert read_manifest(adapter_dir).model_extra == {"notes": "from a newer writer"}


def test_summary(adapter_dir):
    summary = write_manifest(adapter_dir, make_manifest()).summary()
    assert summary == {
        "template": "alpaca-zh",
        "base_model": "tiny",
        "created_at": summary["created_at"],  # no local dirs
        "final_loss": 0.08,
        "steps": 200,
        "dataset_rows": 16,
        "backend": "transformers",
    }


def test_read_returns_none_when_absent(tmp_path):
    assert read_manifest(tmp_path) is None


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "not readable JSON"),
        (b"\xff\xfe\x00bad utf-8", "not readable JSON"),
        ({"schema_version": SCHEMA_VERSION + 1}, f"schema_version {SCHEMA_VERSION + 1}"),
        ({"name": "x"}, "schema_version None"),
        (["a", "list"], "schema_version None"),
        ({"schema_version": SCHEMA_VERSION, "name": "x"}, "is invalid"),
    ],
    ids=["bad JSON", "bad UTF-8", "newer schema", "no schema", "not an object", "missing fields"],
)
def test_read_errors(adapter_dir, content, message):
    if isinstance(content, bytes):
        (adapter_dir / MANIFEST_FILE).write_bytes(content)
    else:
        write_raw(adapter_dir, content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(adapter_dir)


def test_read_error_names_the_missing_field(adapter_dir):
    data = write_manifest(adapter_dir, make_manifest()).model_dump(mode="json")
    del data["template"]
    write_raw(adapter_dir, data)
    with pytest.raises(ManifestError, match="template"):
        read_manifest(adapter_dir)


# --- base fingerprint ------------------------------------------------------------------------------


def fingerprint_of(model_dir, **load_kwargs) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
    return base_fingerprint(model.config, AutoTokenizer.from_pretrained(model_dir))


def test_fingerprint_is_stable_across_loads(tiny_model_dir):
    first = fingerprint_of(tiny_model_dir)
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 32
    assert fingerprint_of(tiny_model_dir) == first


def test_fingerprint_ignores_how_the_weights_were_loaded(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from_config = base_fingerprint(
        AutoConfig.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    )
    assert fingerprint_of(tiny_model_dir, dtype=torch.bfloat16) == fingerprint_of(tiny_model_dir) == from_config


@pytest.mark.parametrize(
    "change",
    [{"num_hidden_layers": 1}, {"vocab_size": 512}, {"intermediate_size": 192}],
    ids=["layers", "vocab", "mlp width"],
)
def test_fingerprint_differs_for_another_model(tiny_model_dir, tmp_path, change):
    from loraserve.tiny_model import TinySpec, build_tiny_model

    # (Not vocab_size=768: the tokenizer corpus saturates at 768 tokens, so that is the default model.)
    other = build_tiny_model(tmp_path / "other", TinySpec(**change))
    assert fingerprint_of(other) != fingerprint_of(tiny_model_dir)


def test_fingerprint_differs_for_another_tokenizer(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    config, tokenizer = AutoConfig.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    before = base_fingerprint(config, tokenizer)
    tokenizer.add_tokens(["<extra-token>"])
    assert base_fingerprint(config, tokenizer) != before


def test_summary_shows_a_hub_id_whole(adapter_dir):
    hub = BaseModelInfo(id="unsloth/llama-3-8b", fingerprint="sha256:" + "ab" * 16)
    assert write_manifest(adapter_dir, make_manifest(base_model=hub)).summary()["base_model"] == "unsloth/llama-3-8b"
