"""CI's run of bench/peer_clients.py: the openai and huggingface_hub clients, streamed and blocking, both
wire formats, at concurrency 1 and 8 against a live server on the tiny model with an adapter. Every
answer must come back whole (exactly the asked tokens on /v1, details on the native route). vLLM's own
client needs its own environment: the full run (bench/results/, NOTES.md there) has it."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bench.peer_clients import hf_rows, openai_rows
from tests.live import LiveServer

pytestmark = pytest.mark.slow


def test_peer_clients_lose_no_request(tiny_model_dir, trained_adapters, monkeypatch):
    from huggingface_hub import constants

    # The session runs with HF_HUB_OFFLINE=1 (no hub downloads), which huggingface_hub applies to every URL.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with LiveServer(tiny_model_dir, trained_adapters.root, adapters={"facts-en": "facts-en"}) as server:
        base = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        rows = asyncio.run(openai_rows(server.url, [base, "facts-en"], [1, 8], output_len=8))
        rows += asyncio.run(hf_rows(server.url, [None, "facts-en"], [1, 8], output_len=8))
    print("\n".join(map(str, rows)))
    assert len(rows) == 12 and all(r.requests >= 8 for r in rows)
    assert not [str(r) for r in rows if r.failed], [str(r) for r in rows if r.failed]
