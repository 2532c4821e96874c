"""The generation engine: one worker thread owns the model; the asyncio side enqueues and awaits.

What it knows: token ids, sampling parameters, an adapter key per request, a tokenizer for
detokenizing and stop strings. What it does NOT know: HTTP, prompts or templates, adapter files,
adapter names beyond the opaque handle it is given.

Scheduling: requests waiting in the inbox are admitted between steps, grouped by adapter into
groups of at most `max_batch_size` rows. Each group has its own KV cache and runs under its one
adapter; every loop iteration advances every group by one token, so a newcomer starts (its prefill)
at the next iteration instead of waiting for running requests to finish, and requests for different
adapters run concurrently. Where the cache allows it (transformers' DynamicCache), a newcomer's rows
then join a running group of the same adapter, and rows that finish leave their group at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import torch

from server.detokenize import Detokenizer, StopMatcher
from server.errors import Overloaded, Unavailable
from server.runner import ModelRunner
from server.sampling import SamplingParams, choose_token, make_generator

log = logging.getLogger("loraserve.engine")


@dataclass
class TokenEvent:
    id: int
    text: str  # text released by this token; may be "" while held back (UTF-8 or stop string)
    logprob: float
    special: bool
    last: bool = False  # the FinalEvent follows at once: streams can close without waiting a step


@dataclass
class FinalEvent:
    generated_text: str
    finish_reason: str  # "eos_token" | "stop_sequence" | "length"
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    tokens: list[TokenEvent]
    first_token_seconds: float
    total_seconds: float


@dataclass
class ErrorEvent:
    message: str


class Sequence:
    """One request inside the engine. Written by the worker; `cancel` may be called from anywhere."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, adapter_key: str | None, tokenizer, emit):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.adapter_key = adapter_key
        self.emit = emit  # thread-safe callable(event)
        self.cancelled = threading.Event()
        self.generator = make_generator(params)
        self.detok = Detokenizer(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.generated: list[int] = []
        self.tokens: list[TokenEvent] = []
        self.finish_reason: str | None = None
        self.enqueued = time.monotonic()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Group:
    """Rows that share an adapter and a KV cache; row i of every tensor is seqs[i]."""

    adapter_key: str | None
    seqs: list[Sequence]
    cache: Any = None
    attention_mask: torch.Tensor | None = None  # [B, past]
    next_positions: torch.Tensor | None = None  # [B]
    last_tokens: torch.Tensor | None = None  # [B]
    decode_state: Any = None  # backend-specific state that must be swapped in before this group's step
    steps: int = 0


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    groups: int = 0
    steps: int = 0
    generated_tokens: int = 0


class Engine:
    def __init__(self, runner: ModelRunner, *, max_batch_size: int, max_running: int, max_queue: int) -> None:
        self.runner = runner
        self.tokenizer = runner.tokenizer
        self.max_batch_size = max_batch_size
        self.max_running = max_running
        self.max_queue = max_queue
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._waiting: list[Sequence] = []
        self._groups: list[Group] = []
        self._accepting = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._admitted = 0  # sequences submitted and not finished (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self._abort_message: str | None = None

    # -- asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def in_flight(self) -> int:
        with self._count_lock:
            return self._admitted

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 adapter_key: str | None) -> AsyncIterator[TokenEvent | FinalEvent | ErrorEvent]:
        """Admit the request now (raises Overloaded / Unavailable at once) and return its events:
        token events, then one FinalEvent or ErrorEvent. Closing the iterator early cancels it."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = Sequence(prompt_ids, params, adapter_key, self.tokenizer, emit=_emitter(loop, events))
        self._admit(seq)
        return self._events(seq, events)

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
        future = asyncio.get_running_loop().create_future()
        self._jobs.put((fn, future, asyncio.get_running_loop()))
        self._wake.set()
        return await future

    def _admit(self, seq: Sequence) -> None:
        if not self._accepting:
            raise Unavailable("server is shutting down")
        with self._count_lock:
            if self._admitted >= self.max_running + self.max_queue:
                raise Overloaded("server is at capacity; retry shortly", headers={"Retry-After": "1"})
            self._admitted += 1
        self._inbox.put(seq)
        self._wake.set()

    # -- worker thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._abort_message:
                self._take_inbox()
                self._fail_all(self._abort_message)
            self._run_jobs()
            self._take_inbox()
            self._start_groups()
            if not self._groups:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for group in list(self._groups):
                self._advance(group)
        self._take_inbox()
        self._fail_all("server stopped")

    def _run_jobs(self) -> None:
        while True:
            try:
                fn, future, loop = self._jobs.get_nowait()
            except queue.Empty:
                return
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

    def _start_groups(self) -> None:
        running = sum(len(g.seqs) for g in self._groups)
        while self._waiting and running < self.max_running:
            key = self._waiting[0].adapter_key
            room = min(self.max_batch_size, self.max_running - running)
            rows = [s for s in self._waiting if s.adapter_key == key][:room]
            for seq in rows:
                self._waiting.remove(seq)
            group = Group(adapter_key=key, seqs=rows)
            running += len(rows)
            if self._prefill(group) and not self._join_running(group):
                self._groups.append(group)
        self.stats.waiting = len(self._waiting)
        self.stats.running = sum(len(g.seqs) for g in self._groups)
        self.stats.groups = len(self._groups)

    def _join_running(self, new: Group) -> bool:
        """Continuous batching: a freshly prefilled group joins a running group of the same adapter
        with room for it, so requests that arrive while others generate share their forward passes."""
        for group in self._groups:
            if group.adapter_key != new.adapter_key or len(group.seqs) + len(new.seqs) > self.max_batch_size:
                continue
            cache = self.runner.merge_rows(group.cache, new.cache)
            if cache is None:
                return False
            length = max(group.attention_mask.shape[-1], new.attention_mask.shape[-1])
            group.cache = cache
            group.attention_mask = torch.cat([_left_pad_mask(group.attention_mask, length),
                                              _left_pad_mask(new.attention_mask, length)])  # [B1+B2, L]
            group.next_positions = torch.cat([group.next_positions, new.next_positions])
            group.last_tokens = torch.cat([group.last_tokens, new.last_tokens])
            group.seqs = group.seqs + new.seqs
            return True
        return False

    def _prefill(self, group: Group) -> bool:
        width = max(len(s.prompt_ids) for s in group.seqs)
        pad = self.tokenizer.pad_token_id
        device = self.runner.device
        ids = torch.tensor([[pad] * (width - len(s.prompt_ids)) + s.prompt_ids for s in group.seqs], device=device)  # [B, S]
        mask = torch.tensor([[0] * (width - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in group.seqs], device=device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # left padding: real tokens count from 0
        return self._step(group, ids, mask, positions, cache=self.runner.new_cache())

    def _advance(self, group: Group) -> None:
        self._drop_finished_rows(group)
        if not group.seqs:
            self._groups.remove(group)
            return
        ids = group.last_tokens.unsqueeze(-1)  # [B, 1]
        mask = torch.cat([group.attention_mask, torch.ones_like(group.last_tokens).unsqueeze(-1)], dim=-1)
        if not self._step(group, ids, mask, group.next_positions.unsqueeze(-1), cache=group.cache):
            self._groups.remove(group)

    def _step(self, group: Group, ids, mask, positions, *, cache) -> bool:
        """One forward pass for the group and one token per live row. False when the group failed."""
        try:
            self.runner.activate(group.adapter_key)
            self.runner.swap_decode_state(group.decode_state)
            logits, cache = self.runner.forward(ids, mask, positions, cache)  # [B, V]
            group.decode_state = self.runner.decode_state()
        except Exception as exc:  # OOM or a kernel error: fail this group, keep serving the others
            log.exception("forward failed for %d rows", len(group.seqs))
            _release_cuda_memory()
            for seq in group.seqs:
                self._fail(seq, f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
            return False
        group.cache, group.attention_mask = cache, mask
        group.next_positions = positions[:, -1] + 1
        group.last_tokens = self._sample_rows(group, logits)
        group.steps += 1
        self.stats.steps += 1
        return True

    def _sample_rows(self, group: Group, logits: torch.Tensor) -> torch.Tensor:
        chosen = []
        for row, seq in enumerate(group.seqs):
            if seq.done or seq.cancelled.is_set():
                if not seq.done:
                    self._finish(seq, "cancelled")
                chosen.append(self.tokenizer.pad_token_id)
                continue
            # The repetition penalty needs every id seen so far; skip building that per token otherwise.
            penalized = seq.params.repetition_penalty != 1.0
            seen = torch.tensor(seq.prompt_ids + seq.generated, device=logits.device) if penalized else None
            token, logprob = choose_token(logits[row], seq.params, seen, seq.generator)
            self._accept(seq, token, logprob)
            chosen.append(token)
        return torch.tensor(chosen, device=self.runner.device)

    def _accept(self, seq: Sequence, token: int, logprob: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        seq.generated.append(token)
        self.stats.generated_tokens += 1
        is_eos = token in seq.params.stop_token_ids
        text = "" if is_eos else seq.stops.feed(seq.detok.push(token))
        if is_eos:
            reason = "eos_token"
        elif seq.stops.stopped:
            reason = "stop_sequence"
        elif len(seq.generated) >= seq.params.max_new_tokens:
            reason = "length"
        else:
            reason = None
        if reason:
            text += seq.stops.flush()
        event = TokenEvent(id=token, text=text, logprob=logprob, special=is_eos, last=reason is not None)
        seq.tokens.append(event)
        seq.emit(event)
        if reason:
            self._finish(seq, reason)

    def _drop_finished_rows(self, group: Group) -> None:
        for seq in group.seqs:
            if seq.cancelled.is_set() and not seq.done:
                self._finish(seq, "cancelled")
        keep = [i for i, s in enumerate(group.seqs) if not s.done]
        if not keep:
            group.seqs = []
            return
        if len(keep) == len(group.seqs):
            return
        cache = self.runner.select_rows(group.cache, keep)
        if cache is None:
            return  # this cache cannot drop rows: finished rows ride along, their tokens ignored
        index = torch.tensor(keep, device=group.attention_mask.device)
        group.cache = cache
        group.seqs = [group.seqs[i] for i in keep]
        group.attention_mask = group.attention_mask[index]
        group.next_positions = group.next_positions[index]
        group.last_tokens = group.last_tokens[index]

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.done:
            return
        seq.finish_reason = reason
        self._retire(seq)  # before the caller hears the end: its next request must find the slot free
        if reason != "cancelled":
            now = time.monotonic()
            seq.emit(FinalEvent(
                generated_text=seq.stops.text, finish_reason=reason, generated_tokens=len(seq.generated),
                prompt_tokens=len(seq.prompt_ids), seed=seq.params.seed, tokens=seq.tokens,
                first_token_seconds=(seq.first_token_at or now) - seq.enqueued, total_seconds=now - seq.enqueued,
            ))

    def _fail(self, seq: Sequence, message: str) -> None:
        if seq.done:
            return
        seq.finish_reason = "error"
        self._retire(seq)
        seq.emit(ErrorEvent(message))

    def _retire(self, seq: Sequence) -> None:
        with self._count_lock:
            self._admitted -= 1

    def _fail_all(self, message: str) -> None:
        for seq in self._waiting + [s for g in self._groups for s in g.seqs]:
            self._fail(seq, message)
        self._waiting.clear()
        self._groups.clear()


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (length - mask.shape[-1], 0))


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[Any], None]:
    def emit(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
            pass

    return emit


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

