"""The engine process: loads the model, runs the Engine, and serves the server's pipes (see the package doc).

Threads: the engine's worker (the model's only user, as in one process), this process's main thread reading
commands, a few reading adapter weights, one watching the server. What the worker hands to its listeners leaves
as one `batch` message per engine iteration (`Outbox`); the readers write only the rare refusal or failed job
(the outbox's lock keeps messages whole). The server's loop reads the events pipe and never blocks on a write
of its own, so a writer here waits at most for that loop. The engine queues whatever it is sent (the server
admits).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path

from safetensors.torch import load as load_safetensors

from contract.lora import WEIGHTS_FILE
from contract.manifest import ADAPTER_FILES, adapter_bytes_sha256
from server.adapters.registry import READS_AT_ONCE
from server.engine.events import FinalEvent, TokenEvent
from server.engine_process.launch import EngineOptions
from server.errors import ServeError

log = logging.getLogger("loraserve.engine_process")


@dataclass
class Hello:
    """The child's first message once the model is loaded: what the server needs to know of it."""

    facts: object  # RunnerFacts
    fingerprint: str
    base: object  # BaseShapes: what adapters are checked against
    tokenizer_files: dict[str, bytes]  # the runner's tokenizer as saved (the loader may have set its pad token)
    numbers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterFiles:
    """An adapter to attach, as the server checked it: its directory (resolved under the adapter root) and the
    sha256 of its files then. The engine process reads them itself (a copy of megabytes through no pipe) and
    attaches them only if they still hash the same."""

    directory: str
    sha256: str


def read_adapter(files: AdapterFiles) -> dict:
    """The adapter's weights as tensors, from files that still hash as the server checked them; else ValueError."""
    contents = {name: (Path(files.directory) / name).read_bytes() for name in ADAPTER_FILES}
    if adapter_bytes_sha256(contents) != files.sha256:
        raise ValueError("its files changed while it was being loaded; load it again")
    return load_safetensors(contents[WEIGHTS_FILE])


@dataclass
class Refusal:
    """The engine refused a submitted request (it was stopping): the server raises `kind` for it."""

    kind: str  # a server.errors class name
    message: str
    headers: dict = field(default_factory=dict)


def main(options: EngineOptions, commands, weights, events) -> None:
    """The child's entry point (multiprocessing spawn target)."""
    # The server decides when this process stops (the `stop` command, or its own end): Ctrl-C in a terminal and
    # a SIGTERM to the process group must drain through the server, not kill the engine under it. Handlers that do
    # nothing rather than SIG_IGN: an ignored signal stays ignored in every program this process starts.
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    _keep_descriptors((commands.fileno(), weights.fileno(), events.fileno()))
    threading.Thread(target=_exit_with_the_server, name="engine-watchdog", daemon=True).start()
    from server.logs import configure

    configure(options.log_level)
    sys.setswitchinterval(options.gil_switch_seconds)
    try:
        engine, runner, hello = _load(options)
    except BaseException as exc:  # the server shows this one line and stops serving
        log.exception("loading the engine failed")
        events.send(("failed", exc.message if isinstance(exc, ServeError) else f"{type(exc).__name__}: {exc}"))
        return
    outbox = Outbox(events)
    events.send(("ready", hello))
    engine.start()
    readers = ThreadPoolExecutor(READS_AT_ONCE, thread_name_prefix="engine-adapter")
    threading.Thread(
        target=_serve_weights, args=(weights, engine, runner, outbox, readers), name="engine-weights", daemon=True
    ).start()
    try:
        _serve_commands(commands, engine, runner, outbox)
    finally:
        readers.shutdown(wait=False, cancel_futures=True)  # a read in progress still ends before the process does
        engine.stop()
        outbox.flush()


def _ignore(signum, frame) -> None:
    pass


def _keep_descriptors(known: tuple[int, ...]) -> None:
    """No program this process starts (a library's helper, os.system) inherits its descriptors: one holding the
    events pipe, or the pipe multiprocessing watches for this process's end, would hide its death from the server.
    Spawning left some inheritable (that watched pipe's end among them, under a number this code is not told)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the ones it knows
        fds = list(known)
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


def _exit_with_the_server() -> None:
    """Whatever this process is doing (loading a model takes minutes), it ends when its server does: it would
    hold the GPU for nobody, and a restarted server would find it full."""
    wait([multiprocessing.parent_process().sentinel])
    os._exit(0)


def _load(options: EngineOptions):
    from contract.fingerprint import base_fingerprint
    from server.adapters.checks import base_shapes
    from server.engine.engine import Engine
    from server.engine.runner import load_runner

    runner = load_runner(**options.runner)
    # The server admits (it knows its limits at once): a place it frees when a stream closes is free here only
    # once the worker drops the request, so a bounded queue here would refuse what the server admitted.
    engine = Engine(
        runner, max_running=runner.cache.slots, max_queue=sys.maxsize, prefill_chunk_tokens=options.prefill_chunk_tokens
    )
    fingerprint = base_fingerprint(runner.model.config, runner.tokenizer)
    hello = Hello(
        facts=runner.facts(),
        fingerprint=fingerprint,
        base=base_shapes(runner.model, fingerprint),
        tokenizer_files=_saved(runner.tokenizer),
        numbers=engine.numbers(),
    )
    return engine, runner, hello


def _saved(tokenizer) -> dict[str, bytes]:
    """The tokenizer's files, as `save_pretrained` writes them: a loader's tokenizer object may be of a class or
    carry methods that unpickle only where that loader was imported (Unsloth patches), its files load anywhere."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in Path(directory).iterdir() if path.is_file()}


class Outbox:
    """The engine's stand-in for an asyncio loop: what the worker hands to `call_soon_threadsafe` (its events'
    delivery, a job's result) runs at once, and what that put here leaves as one message, written by the worker."""

    def __init__(self, conn) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the worker and the readers (refusals, failed jobs) both send
        self._events: list = []  # (request id, packed event)
        self._jobs: list = []  # (job id, result, pickled error or None)

    def call_soon_threadsafe(self, fn, *args) -> None:
        fn(*args)
        self.flush()

    def event(self, rid: int, packed) -> None:
        with self._lock:
            self._events.append((rid, packed))

    def job_done(self, jid: int, result, error: BaseException | None) -> None:
        with self._lock:
            self._jobs.append((jid, result, None if error is None else _portable(error)))

    def flush(self) -> None:
        with self._lock:
            if not self._events and not self._jobs:
                return
            message = ("batch", self._events, self._jobs)
            self._events, self._jobs = [], []
            try:
                self._conn.send(message)
            except (BrokenPipeError, OSError):  # the server is gone: the watchdog ends this process
                pass
            except Exception:  # an event that does not pickle: its request would hang; better end, and be seen to
                log.exception("sending events to the server failed; the engine process exits")
                os._exit(1)


class RequestEvents:
    """A submitted request's stand-in for its asyncio queue: its events go into the outbox, packed."""

    def __init__(self, outbox: Outbox, rid: int, running: dict) -> None:
        self.outbox, self.rid, self.running = outbox, rid, running

    def put_nowait(self, event) -> None:
        self.outbox.event(self.rid, pack(event))
        if not isinstance(event, TokenEvent):  # its last event: nothing to cancel any more
            self.running.pop(self.rid, None)


class JobReply:
    """A job's stand-in for its asyncio future."""

    def __init__(self, outbox: Outbox, jid: int) -> None:
        self.outbox, self.jid = outbox, jid

    def cancelled(self) -> bool:
        return False

    def set_result(self, result) -> None:
        self.outbox.job_done(self.jid, result, None)

    def set_exception(self, error: BaseException) -> None:
        self.outbox.job_done(self.jid, None, error)


def pack(event):
    """A token event as a plain tuple (one per token: pickled fastest); a final event without its tokens (the
    server kept them as they came)."""
    if isinstance(event, TokenEvent):
        return (event.id, event.text, event.logprob, event.special, event.last)
    if isinstance(event, FinalEvent):
        return replace(event, tokens=[])
    return event


def _serve_commands(conn, engine, runner, outbox: Outbox) -> None:
    """Until `stop` or the server's end of the pipe closes."""
    running: dict = {}  # request id → Sequence, until its last event
    while True:
        try:
            command, *args = conn.recv()
        except (EOFError, OSError):
            log.warning("the server closed the command pipe; stopping")
            return
        except Exception:  # a message that does not unpickle: lost, the others still come
            log.exception("reading a command failed")
            continue
        try:
            if _handle(command, args, engine, runner, outbox, running):
                return
        except Exception:  # one command's fault (a bug) is its own: the engine goes on serving the others
            log.exception("the engine process failed a %r command", command)
            if command == "submit":
                outbox.event(args[0], Refusal("GenerationFailed", "the engine could not take this request"))
                outbox.flush()


def _handle(command: str, args: list, engine, runner, outbox: Outbox, running: dict) -> bool:
    """Carry out one command; True for `stop`."""
    if command == "submit":
        _submit(engine, outbox, running, *args)
    elif command == "cancel":
        seq = running.pop(args[0], None)
        if seq is not None:
            seq.cancel()
    elif command == "job":
        jid, name, job_args = args
        _enqueue(engine, runner, outbox, jid, name, job_args)
    elif command == "stop_accepting":
        engine.stop_accepting()
    elif command == "abort_all":
        engine.abort_all(args[0])
    return command == "stop"


def _submit(engine, outbox: Outbox, running: dict, rid: int, prompt_ids, params, adapter_key) -> None:
    listener = (outbox, RequestEvents(outbox, rid, running))
    try:
        seq = engine.submit(prompt_ids, params, adapter_key, listener=listener)
    except ServeError as exc:  # stopping
        outbox.event(rid, Refusal(type(exc).__name__, exc.message, dict(exc.headers or {})))
        outbox.flush()
        return
    running[rid] = seq
    if seq.done:  # it ended before it was recorded (its last event could not take it out)
        running.pop(rid, None)


def _enqueue(engine, runner, outbox: Outbox, jid: int, name: str, args: tuple) -> None:
    """Run job `name` on the worker; one that cannot be built (weights that do not parse) fails with the reason."""
    try:
        job = _job(engine, runner, name, args)
    except Exception as exc:
        outbox.job_done(jid, None, exc)
        outbox.flush()
        return
    engine.enqueue_job(job, JobReply(outbox, jid), outbox)


def _serve_weights(conn, engine, runner, outbox: Outbox, readers: ThreadPoolExecutor) -> None:
    """Adapter attaches, apart from the commands: their files are megabytes, read, parsed and copied by a few
    threads at once (`readers`: a start-up preloading adapters, or loads sent together), off the worker and off the
    commands' thread. Only each one's `keep` queues for the worker."""
    while True:
        try:
            jid, name, args = conn.recv()
        except (EOFError, OSError):
            return
        except Exception:  # a message that does not unpickle: its job is lost, the process goes on
            log.exception("reading an adapter job failed")
            continue
        try:
            readers.submit(_enqueue, engine, runner, outbox, jid, name, args).add_done_callback(_log_escaped)
        except RuntimeError:  # the readers were shut down: the process is stopping
            return


def _log_escaped(future) -> None:
    """A reader's error that no job reply carried (its thread goes on; the job's caller waits on)."""
    if not future.cancelled() and future.exception() is not None:
        log.error("an adapter job failed outside its reply", exc_info=future.exception())


def _job(engine, runner, name: str, args: tuple):
    """The callable the worker runs for job `name`."""
    if name == "attach":  # (read and copied here, in the thread that took the job: never on the worker)
        key, config, files = args
        started = time.perf_counter()
        state_dict = read_adapter(files)
        read = time.perf_counter()
        adapter = runner.host_copy(config, state_dict)
        log.info(
            "adapter %s: files read, verified and parsed in %.2f s, host copy in %.2f s",
            key,
            read - started,
            time.perf_counter() - read,
        )
        return lambda: runner.keep(key, adapter)
    if name == "detach":
        return lambda: runner.detach(args[0])
    if name == "warm_up":
        return runner.warm_up
    if name == "numbers":  # between steps: a scrape of /metrics sees the engine as it is now
        return engine.numbers
    raise ValueError(f"unknown job {name!r}")


def _portable(error: BaseException) -> bytes:
    """The error pickled, or a RuntimeError with its text where it does not pickle (the server re-raises it)."""
    try:
        data = pickle.dumps(error)
        pickle.loads(data)
        return data
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
