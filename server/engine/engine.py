"""The generation engine: one worker thread owns the model; the asyncio side enqueues and awaits.

What it knows: token ids, sampling parameters, an adapter key per request, a tokenizer for
detokenizing and stop strings. What it does NOT know: HTTP, prompts or templates, adapter files,
adapter names beyond the opaque handle it is given.

Scheduling is continuous batching over the runner's KV slots. A request waits until a KV slot (and,
for an adapter, a device adapter slot) is free, then its prompt is prefilled in chunks of at most
`prefill_chunk_tokens`, inside the same forward passes that advance every running sequence by one
token. All running sequences share each pass whatever their adapters (the runner applies each row's
own LoRA); a newcomer joins at the next step and a finished sequence leaves at once, freeing its slot.

One step is in flight while the host reads the one before it: `_iterate` launches step N+1 (forward pass
and token choice queued on the device), then turns step N's tokens into events. The host's work hides
behind the device's instead of adding to it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from server.engine.events import ErrorEvent, FinalEvent, TokenEvent
from server.engine.runner import ModelRunner
from server.engine.sampling import PendingChoices, SamplingParams, choose_tokens
from server.engine.sequence import Sequence
from server.engine.step_plan import StepPlan, plan_step
from server.errors import Overloaded, Unavailable

log = logging.getLogger("loraserve.engine")


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0


class Engine:
    def __init__(
        self, runner: ModelRunner, *, max_running: int, max_queue: int, prefill_chunk_tokens: int = 512
    ) -> None:
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.max_running = max_running
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: list[Sequence] = []
        self._slots: list[Sequence] = []  # running sequences; _slots[i] owns KV slot i
        self._prefilling: list[Sequence] = []  # running sequences whose prompt is not all cached, oldest first
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._admitted = 0  # sequences submitted and not finished (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self._abort_message: str | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # events of this iteration, by listener loop
        self._failed_steps = 0  # consecutive forward passes that raised
        self._in_flight: InFlight | None = None  # the step launched last, whose tokens are not read yet
        self._draining: str | None = None  # the adapter whose device slot the oldest blocked request waits for
        self._drained_for: Sequence | None = None  # that request

    # -- asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._accepting = False
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # the worker is gone: settle whatever slipped in after its last look
            self._settle_everything()

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def in_flight(self) -> int:
        with self._count_lock:
            return self._admitted

    @property
    def full(self) -> bool:
        """Every running and queue place is taken: a request admitted now would be refused."""
        with self._count_lock:
            return self._admitted >= self.max_running + self.max_queue

    def numbers(self) -> dict[str, float]:
        """The engine's and its runner's numbers for /metrics, by metric name (plus its queue and batch sizes)."""
        stats = self.stats
        return {
            "waiting": stats.waiting,
            "running": stats.running,
            "loraserve_engine_steps": stats.steps,
            "loraserve_engine_prefill_tokens": stats.prefill_tokens,
            "loraserve_engine_resident_memory_bytes": resident_memory_bytes(),
            **self.runner.numbers(),
        }

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, adapter_key: str | None
    ) -> AsyncIterator[TokenEvent | FinalEvent | ErrorEvent]:
        """Admit the request now (raises Overloaded / Unavailable at once) and return its events:
        token events, then one FinalEvent or ErrorEvent. Closing the iterator early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = self.submit(prompt_ids, params, adapter_key, listener=(loop, events))
        return self._events(seq, events)

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter_key: str | None, *, listener) -> Sequence:
        """Admit a request whose events go to `listener`, a (loop, queue) pair: once per iteration the worker
        calls `loop.call_soon_threadsafe(deliver, batch)`, and deliver calls `queue.put_nowait(event)` for each
        event. An asyncio loop and queue (generate), or stand-ins that ship the batch to another process
        (server.engine_process). Raises Overloaded / Unavailable at once; `cancel()` the Sequence to stop it."""
        seq = Sequence(prompt_ids, params, adapter_key, self.tokenizer, listener=listener)
        self._admit(seq)
        return seq

    async def _events(self, seq: Sequence, events: asyncio.Queue):
        try:
            while True:
                event = await events.get()
                yield event
                if not isinstance(event, TokenEvent):
                    return
        finally:
            seq.cancel()  # no-op when it finished; otherwise the worker drops it within one step

    def abort_all(self, message: str) -> None:
        """Fail every admitted request with `message` (shutdown after the drain window)."""
        self._abort_message = message
        self._wake.set()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread between steps (adapter loads and unloads) and return its result."""
        if self._stop.is_set():
            raise Unavailable("server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self.enqueue_job(fn, future, asyncio.get_running_loop())
        return await future

    def enqueue_job(self, fn: Callable[[], Any], future, loop) -> None:
        """Run `fn` on the worker thread between steps; its result or exception is settled on `future` through
        `loop.call_soon_threadsafe` (an asyncio pair, or stand-ins as for `submit`)."""
        self._jobs.put((fn, future, loop))
        self._wake.set()
        if self._stop.is_set() and not self._thread.is_alive():  # stop() finished between the check and the put
            self._fail_jobs(Unavailable("server is shutting down"))

    def _admit(self, seq: Sequence) -> None:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        with self._count_lock:
            if self._admitted >= self.max_running + self.max_queue:
                raise overloaded()
            self._admitted += 1
        self._inbox.put(seq)
        self._wake.set()

    # -- worker thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iterate()
            except Exception:  # a bug must cost the running requests, never the thread (everyone would hang)
                log.exception("engine iteration failed; failing the running requests")
                self._in_flight = None
                _release_cuda_memory()
                for seq in list(self._slots):
                    self._fail(seq, "generation failed: internal error (see the server log)")
            self._flush_events()
        self._settle_everything()

    def _settle_everything(self) -> None:
        """Stopped: every admitted request gets its error event and every pending job its error."""
        self._take_inbox()
        self._fail_all("server stopped")
        self._flush_events()
        self._fail_jobs(Unavailable("server is shutting down"))

    def _iterate(self) -> None:
        """One turn: settle jobs and arrivals, launch the next step, then read the tokens of the step
        before it while the device runs the new one (the host's work hides behind the device's)."""
        if self._abort_message:
            self._take_inbox()
            self._fail_all(self._abort_message)
        self._run_jobs()
        self._take_inbox()
        self._drop_cancelled()
        self._start_waiting()
        if self._in_flight is not None and any(_needs_its_tokens(seq) for seq in self._slots):
            self._read(self._finish_in_flight())
        plan = plan_step(
            self._slots,
            self._prefilling,
            cache=self.runner.cache,
            chunk_tokens=self.prefill_chunk_tokens,
            device=self.runner.device,
        )
        launched = self._launch(plan) if plan is not None else None
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._read(previous)
        elif plan is None:
            self._flush_events()
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _finish_in_flight(self) -> InFlight:
        previous, self._in_flight = self._in_flight, None
        return previous

    def _fail_jobs(self, error: Exception) -> None:
        while True:
            try:
                _, future, loop = self._jobs.get_nowait()
            except queue.Empty:
                return
            try:
                loop.call_soon_threadsafe(_settle, future, None, error)
            except RuntimeError:  # that loop is closed: nobody awaits the job any more
                pass

    def _emit(self, seq: Sequence, event) -> None:
        loop, events = seq.listener
        self._outbox.setdefault(loop, []).append((events, event))

    def _flush_events(self) -> None:
        """Hand this iteration's events to their loops: one wake-up per loop per step, not one per token."""
        outbox, self._outbox = self._outbox, {}
        for loop, batch in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
                pass

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, future, loop = self._jobs.get_nowait()
            except queue.Empty:
                return
            # A request whose stream was closed has released its adapter in the registry already; drop
            # it first, so a job that detaches that adapter never finds it still pinned here.
            self._drop_cancelled()
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine, never lost
                result, error = None, exc
            loop.call_soon_threadsafe(_settle, future, result, error)

    def _take_inbox(self) -> None:
        while True:
            try:
                self._waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for seq in [s for s in self._waiting if s.cancelled.is_set()]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        self.stats.waiting = len(self._waiting)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._slots if s.cancelled.is_set()]:
            self._finish(seq, "cancelled")

    def _start_waiting(self) -> None:
        """Give waiting requests, oldest first, a KV slot and their adapter's device slot. A full KV
        cache stops admission (they wait). When every adapter slot is pinned by running requests, the
        oldest request for another adapter waits for one slot to drain: the `_draining` adapter's (the
        fewest running requests), which admits nothing new until it is free. Later requests for the other
        resident adapters go on being admitted (holding them all back, the batch would empty while one
        slot drains); later ones for adapters not on the device, or for the draining one, wait their
        turn. Base-model requests need no adapter slot and go on being admitted."""
        cache, lora = self.runner.cache, self.runner.lora
        adapter_blocked = False
        if self._draining is not None and (not lora.pins.get(self._draining) or self._drained_for not in self._waiting):
            # Its slot has drained (the oldest waiting request takes it), or the request it drained for has
            # started (another slot freed first), been cancelled or failed: choose again when one blocks.
            self._draining = self._drained_for = None
        for seq in list(self._waiting):
            if cache.free == 0 or len(self._slots) >= self.max_running:
                break
            if not seq.prompt_ids or len(seq.prompt_ids) + seq.params.max_new_tokens > cache.max_len:
                self._waiting.remove(seq)
                self._fail(
                    seq,
                    f"prompt ({len(seq.prompt_ids)} tokens) plus max_new_tokens must fit the "
                    f"context of {cache.max_len} tokens",
                )
                continue
            if seq.adapter_key is not None:
                if seq.adapter_key not in lora.host:
                    self._waiting.remove(seq)
                    self._fail(seq, "the adapter was unloaded before the request started")
                    continue
                try:
                    may_pass = seq.adapter_key in lora.resident and seq.adapter_key != self._draining
                    slot = None if adapter_blocked and not may_pass else lora.acquire(seq.adapter_key)
                except Exception as exc:  # its upload failed (e.g. a device error): this request, not every step
                    log.exception("moving adapter %s to the device failed", seq.adapter_key)
                    self._waiting.remove(seq)
                    self._fail(seq, f"the adapter could not be moved to the device: {type(exc).__name__}")
                    continue
                if slot is None:
                    if not adapter_blocked and self._draining is None:
                        self._draining, self._drained_for = lora.soonest_free(), seq
                    adapter_blocked = True
                    continue
                seq.lora_slot = slot
            self._waiting.remove(seq)
            seq.slot = cache.allocate()
            self._slots.append(seq)
            self._prefilling.append(seq)
        self.stats.waiting = len(self._waiting)
        self.stats.running = len(self._slots)

    def _launch(self, plan: StepPlan) -> InFlight | None:
        """Queue the step's forward pass and token choice on the device; None when the pass failed."""
        try:
            logits = self.runner.forward(plan.step)  # [R, V]
        except Exception as exc:  # OOM or a kernel error: fail who is most likely the cause, keep serving
            self._step_failed(plan, exc)
            return None
        self._failed_steps = 0
        choices = None
        if plan.sampled:  # a step of prompt chunks alone, none completing, draws nothing
            choices = choose_tokens(logits, plan.sampled)
            self.runner.cache.last_token.index_copy_(0, plan.sampled_slots, choices.tokens)  # the next step's input
        self.stats.steps += 1
        for seq in plan.decoding:
            seq.cached += 1
        for seq, chunk in zip(plan.prefilling, plan.step.chunks):
            seq.cached += chunk.length
            self.stats.prefill_tokens += chunk.length
        for seq in plan.prefilling:
            if seq.cached == len(seq.prompt_ids):
                self._prefilling.remove(seq)
        for seq in plan.sampled:
            seq.in_flight += 1
        return InFlight(plan.sampled, choices) if choices is not None else None

    def _step_failed(self, plan: StepPlan, exc: Exception) -> None:
        """A failed step wrote nothing it would not write again, so the rows it spares retry it. When
        the step carried prompt chunks (the memory-hungry part), only those requests fail. Otherwise,
        or when the step before failed too, the newest decoding row fails as well, as a preemption
        would pick it: one row per failed step, so a one-off fault (out of memory) costs one request,
        not the batch, and a fault that persists still ends (newcomers alone would be blamed for ever)."""
        log.exception("forward failed (%d decoding, %d prefilling)", len(plan.decoding), len(plan.prefilling))
        _release_cuda_memory()
        self._failed_steps += 1
        message = f"generation failed: {type(exc).__name__}: {str(exc)[:200]}"
        newest = [max(plan.decoding, key=lambda seq: seq.id)] if plan.decoding else []
        blamed = plan.prefilling if plan.prefilling and self._failed_steps == 1 else plan.prefilling + newest
        for seq in blamed:
            self._fail(seq, message)

    def _read(self, step: InFlight) -> None:
        """The tokens of a launched step: each goes to its sequence, unless that one ended meanwhile."""
        for seq, choice in zip(step.sampled, step.choices.result()):
            if seq.done:  # finished, failed or cancelled while this step ran: its token is dropped
                continue
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
            elif choice is None:  # a NaN/inf row fails alone, not the batch
                self._fail(seq, "generation failed: the model produced non-finite logits")
            else:
                self._accept(seq, *choice)

    def _accept(self, seq: Sequence, token: int, logprob: float) -> None:
        event, reason = seq.accept(token, logprob)
        self.stats.generated_tokens += 1
        self._emit(seq, event)
        if reason:
            self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        self._retire(seq)  # before the caller hears the end: its next request must find the slot free
        if reason != "cancelled":
            now = time.monotonic()
            self._emit(
                seq,
                FinalEvent(
                    generated_text=seq.stops.text,
                    finish_reason=reason,
                    generated_tokens=len(seq.generated),
                    prompt_tokens=len(seq.prompt_ids),
                    seed=seq.seed,
                    tokens=seq.tokens,
                    first_token_seconds=(seq.first_token_at or now) - seq.enqueued,
                    total_seconds=now - seq.enqueued,
                ),
            )

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.done:
            return
        seq.finish_reason = "error"
        self._retire(seq)
        self._emit(seq, ErrorEvent(message))

    def _retire(self, seq: Sequence) -> None:
        self._free_slots(seq)
        with self._count_lock:
            self._admitted -= 1

    def _free_slots(self, seq: Sequence) -> None:
        """Give back the sequence's KV slot (the highest running one moves into it) and its adapter pin."""
        if seq.slot is None:
            return
        top = self._slots[-1]
        moved = self.runner.cache.release(seq.slot, top_length=top.cached)
        if moved is not None:
            self._slots[seq.slot], top.slot = top, seq.slot
        self._slots.pop()
        seq.slot = None
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.adapter_key is not None:
            self.runner.lora.release(seq.adapter_key)
        self.stats.running = len(self._slots)

    def _fail_all(self, message: str) -> None:
        for seq in self._waiting + list(self._slots):
            self._fail(seq, message)
        self._waiting.clear()


@dataclass
class InFlight:
    sampled: list[Sequence]  # in logit-row order
    choices: PendingChoices


def _needs_its_tokens(seq: Sequence) -> bool:
    """The repetition penalty reads every id drawn so far on the host: such a row cannot be planned
    while its last token is still on the device."""
    return seq.in_flight > 0 and seq.params.repetition_penalty != 1.0


def resident_memory_bytes() -> int:
    """This process's resident memory: the engine's own process holds the model's host copy and the adapters'
    (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def overloaded() -> Overloaded:
    return Overloaded("server is at capacity; retry shortly", headers={"Retry-After": "1"})


def _deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for events, event in batch:
        events.put_nowait(event)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
