"""The engine in a process of its own (server/engine_process): what only that placement can do wrong.

Every live-server test of tests/test_server_generation.py also runs with the engine in its own process; here:
its death under load, its failure to load, and the pieces that cross the pipes.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from pathlib import Path

import httpx
import pytest

from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine_process import child
from tests.live import LiveServer

ENDLESS = "hello hello hello hello"  # the random tiny model runs it to max_new_tokens (test_server_generation.py)


def engine_child(server: LiveServer) -> int:
    """The pid of the server's engine process: the child that runs multiprocessing's spawn_main (another child
    is multiprocessing's resource tracker)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError("no engine process found")


@pytest.mark.slow
def test_an_engine_process_that_dies_fails_its_streams_in_band_and_stops_the_server(tiny_model_dir, tmp_path):
    """Killed under load (an OOM killer, a crashed driver): every open stream gets an error event, not a hang;
    the server is no longer ready and exits with status 3, saying why, so that an orchestrator restarts it."""
    server = LiveServer(
        tiny_model_dir, engine_process="on", max_new_tokens_cap=2000, log_path=tmp_path / "server.log"
    ).wait_ready()
    try:
        engine = engine_child(server)
        body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 2000}}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(engine, signal.SIGKILL)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert "error" in events[-1] and "engine process exited" in events[-1]["error"], events[-2:]
        assert len(events) < 2000
        code = server.proc.wait(timeout=30)
        log = server.log()
    finally:
        server.stop()
    assert code == 3, log[-3000:]
    assert "engine process exited" in log


@pytest.mark.slow
def test_a_model_that_fails_to_load_in_the_engine_process_ends_the_server_with_status_3(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"")
    server = LiveServer(broken, engine_process="on", log_path=tmp_path / "server.log")
    try:
        code = server.proc.wait(timeout=120)
        log = server.log()
    finally:
        server.stop()
    assert code == 3, log[-3000:]
    assert "loading failed" in log


def test_token_events_cross_as_tuples_and_final_events_without_their_tokens():
    token = TokenEvent(id=7, text=" a", logprob=-0.5, special=False, last=True)
    assert TokenEvent(*child.pack(token)) == token
    final = FinalEvent("a", "length", 1, 3, None, [token], 0.1, 0.2)
    packed = child.pack(final)
    assert packed.tokens == [] and final.tokens == [token]  # the sender's event is untouched
    assert child.pack(ErrorEvent("x")) == ErrorEvent("x")


def test_job_errors_cross_as_themselves_or_as_their_text():
    assert isinstance(pickle.loads(child._portable(ValueError("rank 512 is over"))), ValueError)

    class Local(Exception):  # not importable by name on the other side
        pass

    crossed = pickle.loads(child._portable(Local("odd")))
    assert isinstance(crossed, RuntimeError) and "Local: odd" in str(crossed)
