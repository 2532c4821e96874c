"""The server's side of the engine process (see the package doc): the Engine surface over three pipes.

Admission is decided here, at once, from this side's own count of requests in flight (as the in-process
engine does); the engine process queues whatever it is sent. Each request's token events are kept as they
arrive; its final event comes without them and gets them back here.

Nothing here writes to a pipe from the event loop: commands go through a queue to one writer thread, so a full
pipe never stalls the loop, and a signal handler (the drain on SIGTERM calls `stop_accepting`) never finds a
write of its own thread half done. Commands keep their order: a cancel reaches the engine before a later detach
of the adapter it held, as in one process. Only adapter attaches take the weights pipe: the engine process reads
the adapter's files there, off its commands' thread.

If the engine process dies, every request in flight gets an error event, every job fails, and `on_lost` is
called (the server then stops: an orchestrator restarts it). Its death is seen on a pidfd, not only as the end of
its pipes, which a process it forked could hold open. At interpreter exit a child still alive is killed: it
ignores SIGTERM, and would otherwise hold the GPU after its server is gone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import queue
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from server import errors
from server.engine.engine import EngineStats, overloaded
from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine.sampling import SamplingParams
from server.engine_process import child, launch
from server.engine_process.launch import EngineOptions
from server.errors import ServeError, Unavailable

log = logging.getLogger("loraserve.engine_process")
MESSAGES_PER_WAKE = 64  # events messages handled per loop callback: a busy engine never holds the loop for long
NUMBERS_WAIT_SECONDS = 0.5  # a /metrics scrape waits this long for fresh engine numbers, then uses the last ones


@dataclass
class _Stream:
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tokens: list[TokenEvent] = field(default_factory=list)


class EngineProcess:
    def __init__(self, options: EngineOptions, *, max_queue: int) -> None:
        # The one `loraserve serve` started early, if any. Held: dropped unstopped, its process is killed (launch).
        launched = self._launched = launch.adopt(options) or launch.launch(options)
        self._process, self._weights, self._events = launched.process, launched.weights, launched.events
        commands = launched.commands
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe even from a signal handler
        threading.Thread(
            target=_write_all, args=(self._outgoing, commands), name="engine-commands", daemon=True
        ).start()
        self.max_queue = max_queue
        self.max_running = 0  # the KV slots: known once the model is loaded (wait_ready)
        self.tokenizer = None
        self.on_lost: Callable[[str], None] = lambda reason: None
        self._numbers: dict = {}
        self._streams: dict[int, _Stream] = {}
        self._jobs_pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._weights_lock = threading.Lock()
        self._admitted = 0
        self._accepting = True
        self._lost: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit_fd: int | None = None  # watched for the process's end, from start() until _close_reader

    def wait_ready(self) -> child.Hello:
        """Blocking (call it off the event loop): the child's Hello once its model is loaded, or the reason it
        failed as a ServeError."""
        try:
            from transformers import AutoTokenizer  # noqa: F401  (seconds of imports, while the child loads)

            kind, payload = self._first_message()
        except BaseException:
            self._process.kill()  # whatever it was doing, nobody will use it
            raise
        if kind == "failed":
            self._process.join(timeout=10)
            raise ServeError(payload)
        self.tokenizer = _load_tokenizer(payload.tokenizer_files)
        self.max_running = payload.facts.kv_slots
        self._numbers = payload.numbers
        return payload

    def _first_message(self):
        while not self._events.poll(1.0):
            if not self._process.is_alive():
                raise ServeError(f"the engine process exited while loading (exit code {self._process.exitcode})")
        try:
            return self._events.recv()
        except EOFError:
            raise ServeError("the engine process exited while loading (see its log above)") from None

    # -- the Engine surface ---------------------------------------------------------------------
    def start(self) -> None:
        """Listen on the events pipe from the running loop (every event is handled on it)."""
        self._loop = asyncio.get_running_loop()
        watch(self._loop, self._events, self._on_readable)
        # Its death, also where the events pipe never reads as ended: a process it forked (a library's helper) holds
        # every descriptor it had, the pipe's write end and multiprocessing's sentinel pipe among them.
        self._exit_fd = exit_descriptor(self._process)
        self._loop.add_reader(self._exit_fd, self._on_exit)

    def stop(self) -> None:
        """Stop the child: it fails what it still runs, and those events are handled before it is joined."""
        self._accepting = False
        self._send(("stop",))
        self._read_until_exit(timeout=30)
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=5)
        self._close_reader()
        self._fail_everything("server stopped")
        self._outgoing.put(None)  # the writer closes the commands pipe and ends
        for conn in (self._events, self._weights):
            conn.close()

    def stop_accepting(self) -> None:
        self._accepting = False
        self._send(("stop_accepting",))

    def abort_all(self, message: str) -> None:
        self._send(("abort_all", message))

    @property
    def in_flight(self) -> int:
        return self._admitted

    @property
    def full(self) -> bool:
        return self._admitted >= self.max_running + self.max_queue

    def numbers(self) -> dict[str, float]:
        return self._numbers

    @property
    def stats(self) -> EngineStats:
        """The queue and batch sizes (/metrics), as of the last numbers the engine sent."""
        n = self._numbers
        return EngineStats(
            waiting=n["waiting"],
            running=n["running"],
            steps=n["loraserve_engine_steps"],
            prefill_tokens=n["loraserve_engine_prefill_tokens"],
        )

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter_key: str | None
    ) -> AsyncIterator[TokenEvent | FinalEvent | ErrorEvent]:
        """As Engine.generate: admitted now (raises Overloaded / Unavailable at once), then its events."""
        if self._lost or not self._accepting:
            raise Unavailable(self._lost or "server is shutting down")
        if self.full:
            raise overloaded()
        rid = next(self._ids)
        stream = self._streams[rid] = _Stream()
        self._admitted += 1
        self._send(("submit", rid, prompt_ids, params, adapter_key))
        return self._events_of(rid, stream)

    async def _events_of(self, rid: int, stream: _Stream):
        try:
            while True:
                event = await stream.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if not isinstance(event, TokenEvent):
                    return
        finally:
            if rid in self._streams:  # closed before its last event: the engine drops it within a step
                self._finished(rid)
                self._send(("cancel", rid))

    # -- jobs: the adapter registry's attach / detach, the warm-up, the numbers -------------------
    @staticmethod
    def weights_of(checked) -> child.AdapterFiles:
        """What the registry hands `attach` as an adapter's weights: where its checked files are, not tensors."""
        return child.AdapterFiles(directory=str(checked.path), sha256=checked.sha256)

    async def attach(self, key: str, config, files: child.AdapterFiles) -> None:
        jid, future = self._new_job()
        try:
            await asyncio.to_thread(self._send_weights, (jid, "attach", (key, config, files)))
        except (BrokenPipeError, OSError):
            self._jobs_pending.pop(jid, None)
            raise Unavailable("the engine process is gone") from None
        await future

    async def detach(self, key: str) -> None:
        await self._job("detach", key)

    async def warm_up(self) -> None:
        await self._job("warm_up")

    async def refresh(self) -> None:
        """Fresh numbers from the engine, between its steps; the last ones if it does not answer in time."""
        try:
            self._numbers = await asyncio.wait_for(self._job("numbers"), NUMBERS_WAIT_SECONDS)
        except (asyncio.TimeoutError, ServeError):
            pass

    async def _job(self, name: str, *args):
        """A small job, through the commands pipe: in order with the cancels sent before it."""
        jid, future = self._new_job()
        self._send(("job", jid, name, args))
        return await future

    def _new_job(self) -> tuple[int, asyncio.Future]:
        if self._lost:
            raise Unavailable(self._lost)
        jid = next(self._ids)
        future = self._jobs_pending[jid] = asyncio.get_running_loop().create_future()
        return jid, future

    def _send_weights(self, message) -> None:
        with self._weights_lock:
            self._weights.send(message)

    # -- the events pipe ------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            for _ in range(MESSAGES_PER_WAKE):
                if not self._events.poll():
                    return
                self._handle(self._events.recv())
        except (EOFError, OSError):
            self._close_reader()
            self._engine_lost(self._exit_reason())

    def _on_exit(self) -> None:
        """The process ended: what it finished sending is handled, then everything still open fails."""
        self._close_reader()
        os.set_blocking(self._events.fileno(), False)  # a message it was writing as it died never completes
        try:
            while self._events.poll():
                self._handle(self._events.recv())
        except (EOFError, OSError):  # BlockingIOError: the rest of a message that never came
            pass
        self._engine_lost(self._exit_reason())

    def _exit_reason(self) -> str:
        self._process.join(timeout=1)  # the pipe's end can come before the process is reaped
        return f"the engine process exited (exit code {self._process.exitcode})"

    def _read_until_exit(self, *, timeout: float) -> None:
        """Handle what the child sends until it closes its end (it does on exit) or `timeout` passes."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self._events.poll(0.1):
                    self._handle(self._events.recv())
                elif not self._process.is_alive():  # gone, its pipe maybe held open by a process it forked
                    return
            except (EOFError, OSError):
                return

    def _handle(self, message) -> None:
        _, events, jobs = message
        for rid, packed in events:
            self._deliver(rid, packed)
        for jid, result, error in jobs:
            future = self._jobs_pending.pop(jid, None)
            if future is not None and not future.done():
                future.set_result(result) if error is None else future.set_exception(pickle.loads(error))

    def _deliver(self, rid: int, packed) -> None:
        stream = self._streams.get(rid)
        if stream is None:  # its reader left: it was cancelled here
            return
        if type(packed) is tuple:
            event = TokenEvent(*packed)
            stream.tokens.append(event)
        else:
            self._finished(rid)
            if isinstance(packed, FinalEvent):
                event = replace(packed, tokens=stream.tokens)
            elif isinstance(packed, child.Refusal):
                kind = getattr(errors, packed.kind, None)
                kind = kind if isinstance(kind, type) and issubclass(kind, ServeError) else Unavailable
                event = kind(packed.message, headers=packed.headers)
            else:
                event = packed
        stream.queue.put_nowait(event)

    def _finished(self, rid: int) -> None:
        if self._streams.pop(rid, None) is not None:
            self._admitted -= 1

    def _engine_lost(self, reason: str) -> None:
        if self._lost:
            return
        log.error("%s: failing %d requests in flight", reason, len(self._streams))
        self._lost = reason
        self._fail_everything(reason)
        self.on_lost(reason)

    def _fail_everything(self, reason: str) -> None:
        for rid, stream in list(self._streams.items()):
            self._finished(rid)
            stream.queue.put_nowait(ErrorEvent(reason))
        for future in self._jobs_pending.values():
            if not future.done():
                future.set_exception(Unavailable(reason))
        self._jobs_pending.clear()

    def _close_reader(self) -> None:
        """Stop watching the events pipe and the process's end (once)."""
        if self._exit_fd is None:
            return
        if not self._loop.is_closed():
            self._loop.remove_reader(self._events.fileno())
            self._loop.remove_reader(self._exit_fd)
        if self._exit_fd != self._process.sentinel:
            os.close(self._exit_fd)
        self._exit_fd = None

    def _send(self, message) -> None:
        """Queue a command for the writer thread (never blocks, never raises: a dead child shows as the events
        pipe's end, which fails everything in flight)."""
        self._outgoing.put(message)


def exit_descriptor(process) -> int:
    """A descriptor that turns readable when `process` has ended: a pidfd where the OS has them (Linux), which no
    other process can hold open; else multiprocessing's sentinel pipe."""
    try:
        return os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return process.sentinel


def watch(loop: asyncio.AbstractEventLoop, conn, on_readable: Callable[[], None]) -> None:
    """Call `on_readable` on `loop` whenever `conn` has data; its `recv` then returns whole messages."""
    loop.add_reader(conn.fileno(), on_readable)
    # uvloop (uvicorn's loop wherever it is installed) makes a watched descriptor non-blocking. A message still
    # being written (a pipe holds 64 KiB) would then fail half-read with BlockingIOError, which reads as the
    # engine's death. Blocking, `recv` waits for the rest of it, as on asyncio's own loop.
    os.set_blocking(conn.fileno(), True)


def _load_tokenizer(files: dict[str, bytes]):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as directory:
        for name, data in files.items():
            (Path(directory) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(directory)


def _write_all(outgoing: queue.SimpleQueue, conn) -> None:
    """The commands pipe's only writer, until the child is gone or the server stops it (None)."""
    while (message := outgoing.get()) is not None:
        try:
            conn.send(message)
        except (BrokenPipeError, OSError):
            return
        except Exception:  # a command that does not pickle: lost, but every later one still goes
            log.exception("sending a command to the engine process failed: %.200r", message)
    conn.close()


async def run_job(fn):
    """The adapter registry's `run_on_worker` over an engine process: `fn` calls `EngineProcess.attach` or
    `detach`, which return a coroutine (in one process, the engine's `call` runs `fn` on its worker)."""
    return await fn()
