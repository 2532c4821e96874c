"""The engine in a process of its own (server/engine_process): what only that placement can do wrong.

Every live-server test of tests/test_server_generation.py (and the failed-load test of test_api_edge_cases.py)
also runs with the engine in its own process; here: its death under load, its lifetime, admission, and the
pieces that cross the pipes.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import signal
import struct
import threading
import time
from pathlib import Path

import httpx
import pytest

from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine_process import child
from server.engine_process.client import watch
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


def metric(server: LiveServer, name: str) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return next(float(line.split()[-1]) for line in lines if line.startswith(name + " "))


@pytest.mark.slow
def test_the_engine_process_shows_its_memory_and_leaves_signals_and_pipes_to_itself(tiny_model_dir, tmp_path):
    """/metrics reports the engine process's memory (the model and adapters live there, not in the server); a
    program it starts neither inherits SIGINT/SIGTERM ignored (its helpers could not be stopped) nor its pipes
    (which would outlive it and hide its death)."""
    server = LiveServer(tiny_model_dir, engine_process="on", log_path=tmp_path / "server.log").wait_ready()
    try:
        engine = engine_child(server)
        reported = metric(server, "loraserve_engine_resident_memory_bytes")
        resident = int(Path(f"/proc/{engine}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        assert abs(reported - resident) < 0.1 * resident, (reported, resident)
        assert reported != metric(server, "process_resident_memory_bytes")
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{engine}/status").read_text().splitlines())
        ignored = int(status["SigIgn"], 16)
        assert not ignored & (1 << (signal.SIGINT - 1) | 1 << (signal.SIGTERM - 1)), status["SigIgn"]
        pipes = [fd for fd in Path(f"/proc/{engine}/fd").iterdir() if os.readlink(fd).startswith("pipe:")]
        inherited = [fd.name for fd in pipes if not int(fdinfo(engine, fd.name)["flags"], 8) & os.O_CLOEXEC]
        assert pipes and inherited == [], inherited
    finally:
        server.stop()


def fdinfo(pid: int, fd: str) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}


@pytest.mark.slow
@pytest.mark.parametrize("pipe", ["its own", "held open by another process"])
def test_an_engine_process_that_dies_fails_its_streams_in_band_and_stops_the_server(tiny_model_dir, tmp_path, pipe):
    """Killed under load (an OOM killer, a crashed driver): every open stream gets an error event, not a hang;
    the server is no longer ready and exits with status 3, saying why, so that an orchestrator restarts it. Also
    when another process holds every pipe it had open, as a helper it forked would: its events pipe never reads as
    closed, nor does multiprocessing's sentinel pipe turn readable."""
    server = LiveServer(
        tiny_model_dir, engine_process="on", max_new_tokens_cap=2000, log_path=tmp_path / "server.log"
    ).wait_ready()
    held = []
    try:
        engine = engine_child(server)
        if pipe != "its own":  # the write ends a forked helper would hold
            for fd in Path(f"/proc/{engine}/fd").iterdir():
                if os.readlink(fd).startswith("pipe:") and int(fdinfo(engine, fd.name)["flags"], 8) & os.O_WRONLY:
                    held.append(os.open(fd, os.O_WRONLY))
            assert held
        body = {"inputs": ENDLESS, "parameters": {"max_new_tokens": 2000}}
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=20) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(engine, signal.SIGKILL)
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert "error" in events[-1] and "engine process exited (exit code -9)" in events[-1]["error"], events[-2:]
        assert len(events) < 2000
        code = server.proc.wait(timeout=30)
        log = server.log()
    finally:
        for fd in held:
            os.close(fd)
        server.stop()
    assert code == 3, log[-3000:]
    assert "engine process exited" in log


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL while serving", "SIGINT while loading"])
def test_the_engine_process_never_outlives_its_server(tiny_model_dir, tmp_path, how):
    """It ignores SIGINT and SIGTERM (the server drains first), so it must end by itself when the server goes:
    killed outright, or stopped by Ctrl-C before the model finished loading (it would hold the GPU for nobody)."""
    server = LiveServer(tiny_model_dir, engine_process="on", log_path=tmp_path / "server.log")
    try:
        if how == "SIGKILL while serving":
            server.wait_ready()
        engine = engine_child(server)
        server.proc.send_signal(signal.SIGKILL if how.startswith("SIGKILL") else signal.SIGINT)
        server.proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{engine}").exists() and Path(f"/proc/{engine}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline, f"the engine process outlived its server ({how})"
            time.sleep(0.1)
    finally:
        server.stop()


def test_a_place_freed_by_a_cancel_is_never_refused_by_the_engine_process(tiny_model_dir):
    """The server counts a place free as soon as a stream closes; the engine process frees it a step later. A
    client that cancels and resubmits at the limit must never meet the engine's own refusal."""
    import asyncio

    from server.engine.sampling import SamplingParams
    from server.engine_process.client import EngineProcess
    from server.engine_process.launch import engine_options
    from server.errors import ServeError
    from server.settings import ServerSettings

    async def churn() -> list[str]:
        settings = ServerSettings(base_model=str(tiny_model_dir), max_running=2, max_queue=2, max_context=512)
        engine = EngineProcess(engine_options(settings), max_queue=settings.max_queue)
        await asyncio.to_thread(engine.wait_ready)
        engine.start()
        refused: list[str] = []

        async def consume(events):
            try:
                async for event in events:
                    if isinstance(event, ErrorEvent):
                        refused.append(event.message)
            except ServeError as exc:
                refused.append(f"{type(exc).__name__}: {exc.message}")

        tasks: list[asyncio.Task] = []
        try:
            for round in range(80):
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                params = SamplingParams(max_new_tokens=20 if round == 79 else 400)  # the last round runs to its end
                tasks = [asyncio.create_task(consume(engine.generate([1, 2, 3] * 30, params, None))) for _ in range(4)]
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            assert engine.in_flight == 0
        finally:
            engine.stop()
        return refused

    before = threading.active_count()
    assert asyncio.run(churn()) == []
    time.sleep(0.5)  # the commands writer ends once stopped: an embedder starting engines leaks no thread per engine
    assert threading.active_count() <= before
    assert not any(thread.name == "engine-commands" for thread in threading.enumerate())


def test_the_tokenizer_crosses_as_its_files_and_encodes_the_same(tiny_model_dir):
    """The server tokenizes prompts with the engine's tokenizer, rebuilt from its saved files (a loader's object
    may not unpickle where the loader was never imported): the same ids, special tokens and chat template."""
    from transformers import AutoTokenizer

    from server.engine_process.client import _load_tokenizer

    original = AutoTokenizer.from_pretrained(tiny_model_dir)
    original.pad_token = original.eos_token  # as load_runner sets it where a model has none
    original.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rebuilt = _load_tokenizer(child._saved(original))
    for text in ("The capital of France is", "  spaces,\ttabs\nand 中文 ✓", ""):
        assert rebuilt(text).input_ids == original(text).input_ids
    assert (rebuilt.pad_token_id, rebuilt.eos_token_id, rebuilt.bos_token_id) == (
        original.pad_token_id,
        original.eos_token_id,
        original.bos_token_id,
    )
    assert rebuilt.all_special_tokens == original.all_special_tokens
    messages = [{"role": "user", "content": "hi"}]
    assert rebuilt.apply_chat_template(messages, tokenize=False) == original.apply_chat_template(
        messages, tokenize=False
    )


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


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_message_that_arrives_in_pieces_is_read_whole(loop_kind):
    """The events pipe under load: the child may still be writing a message when the server's loop is told the
    pipe is readable. uvloop (uvicorn's choice where installed) makes watched descriptors non-blocking; reading
    half a message then raised BlockingIOError, which the server took for the engine's death (status 3, every
    stream failed)."""
    new_loop = pytest.importorskip("uvloop").new_event_loop if loop_kind == "uvloop" else asyncio.new_event_loop
    reader, writer = multiprocessing.Pipe(duplex=False)
    message = ("batch", [(1, (7, "x" * 300_000, -0.5, False, False))], [])  # larger than a pipe holds
    frame = pickle.dumps(message)
    received, failures = [], []

    def on_readable():
        try:
            received.append(reader.recv())
        except Exception as exc:
            failures.append(exc)

    def write_in_two_pieces():  # multiprocessing's frame: a 4-byte big-endian length, then the bytes
        data = struct.pack("!i", len(frame)) + frame
        os.write(writer.fileno(), data[:1000])
        time.sleep(0.3)  # the reader is woken by the first piece and finds the pipe empty before the rest
        view = memoryview(data)[1000:]
        while view:
            view = view[os.write(writer.fileno(), view) :]

    async def main():
        watch(asyncio.get_running_loop(), reader, on_readable)
        threading.Thread(target=write_in_two_pieces, daemon=True).start()  # blocked for ever if a read failed
        while not received and not failures:
            await asyncio.sleep(0.01)

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert failures == [] and received == [message]


def test_the_engine_process_attaches_only_the_files_the_server_checked(tiny_model_dir, tmp_path):
    """The engine process reads an adapter's files itself (no copy of its weights through a pipe), so it checks
    they still hash as the server checked them: files rewritten in between are refused, not served as another
    version under the checked one's name."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from bench.engine_bench.workload import lora_config, random_adapter
    from contract.manifest import adapter_sha256

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def write(seed: int) -> None:
        lora_config(8).save_pretrained(tmp_path)
        state = random_adapter(base, rank=8, seed=seed)
        save_file({key: value.contiguous() for key, value in state.items()}, tmp_path / "adapter_model.safetensors")

    write(seed=1)
    files = child.AdapterFiles(directory=str(tmp_path), sha256=adapter_sha256(tmp_path))
    weights = child.read_adapter(files)
    assert weights and all(name.endswith(".weight") for name in weights)
    write(seed=2)  # rewritten after the check
    with pytest.raises(ValueError, match="changed while it was being loaded"):
        child.read_adapter(files)


def test_the_launcher_and_the_command_line_import_no_torch():
    """`loraserve serve` starts the engine process before the server's imports (launch.prelaunch): the launcher
    importing torch would put those seconds back in front of it."""
    import subprocess
    import sys

    code = "import sys, loraserve.cli, server.engine_process.launch; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.fixture
def early_launches():
    """Whatever a test leaves prelaunched is stopped: the next ServerState would adopt it."""
    from server.engine_process import launch

    yield launch
    left = launch.adopt(launch._prelaunched.options) if launch.prelaunched() else None
    if left is not None:
        launch.kill_if_alive(left.process)


def test_the_engine_process_started_early_is_adopted_or_replaced(tiny_model_dir, monkeypatch, early_launches):
    """The server adopts the engine process `loraserve serve` started early when its options are the ones the
    server would start one with; one started with other options is stopped and another started. Without a GPU,
    `auto` starts none early (nor does `off`)."""
    from server.engine_process.client import EngineProcess
    from server.settings import ServerSettings

    launch = early_launches
    settings = ServerSettings(base_model=str(tiny_model_dir), engine_process="on", max_context=512)
    assert launch.prelaunch(settings, log_level="warning")
    early = launch._prelaunched.process

    async def serve_one(engine: EngineProcess) -> list[int]:
        await asyncio.to_thread(engine.wait_ready)
        engine.start()
        try:
            from server.engine.sampling import SamplingParams

            events = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=3), None)
            return [event.id async for event in events if isinstance(event, TokenEvent)]
        finally:
            engine.stop()

    adopted = EngineProcess(launch.engine_options(settings, log_level="WARNING"), max_queue=4)
    assert adopted._process is early and not launch.prelaunched()
    assert len(asyncio.run(serve_one(adopted))) == 3

    assert launch.prelaunch(settings, log_level="warning")
    early = launch._prelaunched.process
    other = ServerSettings(base_model=str(tiny_model_dir), engine_process="on", max_context=256)
    replaced = EngineProcess(launch.engine_options(other, log_level="warning"), max_queue=4)
    assert replaced._process is not early and not early.is_alive()
    assert len(asyncio.run(serve_one(replaced))) == 3

    monkeypatch.setattr(launch, "gpu_present", lambda: False)
    for placement in ("auto", "off"):
        quiet = ServerSettings(base_model=str(tiny_model_dir), engine_process=placement)
        assert not launch.prelaunch(quiet, log_level="warning") and not launch.prelaunched()
