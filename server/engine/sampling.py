"""Sampling parameters and the choice of every row's next token, all rows at once on the device.

Rows in a batch may carry different parameters (greedy or sampled, temperature, top-k, top-p,
repetition penalty, seed); they are applied as per-row tensors in one pass, and one small copy brings
the chosen ids and their log-probabilities back to the host. Never a per-row loop, never a copy of a
probability vector.

Seeded draws are reproducible whatever else runs: a row's random numbers come from a counter-based
hash of (seed, how many tokens it drew before, token id), not from a generator whose state depends
on the batch. Drawing is the exponential race (argmax of p / E with E ~ Exp(1)), which picks token i
with probability p_i.

On CUDA the whole choice is one Triton kernel (sampling_kernel.py: the same arithmetic, thresholds
found by search instead of a sort); the functions below are its definition and the path everywhere else.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

import torch

from server.engine.transfer import to_device

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit value (SplitMix64's increment)
_MIX1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685  # 0x94D049BB133111EB
SEED_LIMIT = 2**53  # seeds drawn for clients stay exact in JavaScript
log = logging.getLogger("loraserve.sampling")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)


def draw_seed(params: SamplingParams) -> int:
    """The seed a sampled request draws with: its own, or a fresh one (greedy rows draw nothing)."""
    return params.seed if params.seed is not None else secrets.randbelow(SEED_LIMIT)


@dataclass
class RowParams:
    """Every row's parameters as device tensors, built with one host→device copy per dtype."""

    sample: torch.Tensor  # [R] bool
    temperature: torch.Tensor  # [R, 1]
    top_p: torch.Tensor  # [R, 1]
    top_k: torch.Tensor  # [R, 1] long, 0 = off
    penalty: torch.Tensor  # [R, 1]
    key: torch.Tensor  # [R, 1] long: hash of (seed, draws so far)
    any_sample: bool
    any_top_k: bool  # some sampled row has top-k
    any_top_p: bool  # some sampled row has top-p
    seen: torch.Tensor | None  # [R, L] ids seen (prompt + generated), padded with a row's own ids; None: no penalty

    @property
    def any_warp(self) -> bool:
        """Some sampled row has top-k or top-p."""
        return self.any_top_k or self.any_top_p


def row_params(seqs: list, device) -> RowParams:
    """Parameters of each row for seqs[i] (with `params`, `seed`, `prompt_ids`, `generated`, `in_flight`)."""
    params = [seq.params for seq in seqs]
    floats = torch.tensor(
        [
            [
                p.temperature if p.do_sample else 1.0,
                p.top_p if p.do_sample else 1.0,
                p.repetition_penalty,
                1.0 if p.do_sample else 0.0,
            ]
            for p in params
        ],
        dtype=torch.float32,
    )
    ints = torch.tensor(
        [
            [p.top_k if p.do_sample else 0, _row_key(seq.seed or 0, len(seq.generated) + seq.in_flight)]
            for p, seq in zip(params, seqs)
        ],
        dtype=torch.long,
    )
    floats, ints = to_device(floats, device), to_device(ints, device)
    penalized = any(p.repetition_penalty != 1.0 for p in params)
    return RowParams(
        sample=floats[:, 3] > 0,
        temperature=floats[:, 0:1].clamp_min(1e-5),
        top_p=floats[:, 1:2],
        top_k=ints[:, 0:1],
        penalty=floats[:, 2:3],
        key=ints[:, 1:2],
        any_sample=any(p.do_sample for p in params),
        any_top_k=any(p.do_sample and p.top_k > 0 for p in params),
        any_top_p=any(p.do_sample and p.top_p < 1.0 for p in params),
        seen=_seen_ids(seqs, device) if penalized else None,
    )


@dataclass
class _WarmUpRow:
    params: SamplingParams
    seed: int = 0
    prompt_ids: tuple[int, ...] = (0,)
    generated: tuple[int, ...] = ()
    in_flight: int = 0


def warm_up(vocab: int, device) -> None:
    """Choose with each mix of cuts (greedy only; sampling with top-p, top-k, both, neither), so that the
    CUDA kernels are built before a request waits for one, and checked on each path."""
    device = torch.device(device)
    for rows in _warm_up_rows():
        logits = torch.randn(len(rows), vocab, device=device, dtype=torch.float32)
        choose_on_device(logits, row_params(rows, device)).cpu()


def build_kernels(vocab: int, device) -> bool:
    """The CUDA kernels of warm_up's mixes of cuts compiled and launched once, and nothing else: the kernel path's
    checks and its trust are left to warm_up (runner.build_kernels_early calls this while the model loads, when an
    error or a shortage of memory must not decide the kernel's fate). False where there is no kernel to build."""
    module = _cuda_path().module
    if module is None:
        return False
    device = torch.device(device)
    for rows in _warm_up_rows():
        # float32 said: a model load in another thread sets torch's default dtype to its own for a while
        logits = torch.randn(len(rows), vocab, device=device, dtype=torch.float32)
        module.choose(logits, row_params(rows, device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # built and run: the time it took is the build's
    return True


def _warm_up_rows() -> list[list[_WarmUpRow]]:
    greedy = _WarmUpRow(SamplingParams(1))
    return [
        [greedy] if cuts is None else [greedy, _WarmUpRow(SamplingParams(1, do_sample=True, **cuts))]
        for cuts in ({}, {"top_p": 0.9}, {"top_k": 5}, {"top_p": 0.9, "top_k": 5}, None)
    ]


def choose_tokens(logits: torch.Tensor, seqs: list) -> PendingChoices:
    """Launch the choice of each row's next token for seqs[i] from logits [R, V] float32; the result
    comes back to the host without blocking the device (`PendingChoices.result`)."""
    return PendingChoices(choose_on_device(logits, row_params(seqs, logits.device)))


class PendingChoices:
    """The chosen tokens on the device (`tokens`, [R] long) and on their way to the host."""

    def __init__(self, packed: torch.Tensor) -> None:  # [3, R] float64 from choose_on_device
        self.tokens = packed[0].long()
        if packed.is_cuda:  # one small copy into pinned memory, waited for only when read
            self._host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            self._host.copy_(packed, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host, self._ready = packed, None

    def result(self) -> list[tuple[int, float] | None]:
        """(token, logprob) per row, or None for a row whose logits held NaN or +inf (nothing can be
        drawn from it: that row fails alone)."""
        if self._ready is not None:
            self._ready.synchronize()
        tokens, logprobs, ok = self._host.tolist()
        return [(int(t), lp) if good else None for t, lp, good in zip(tokens, logprobs, ok)]


def choose_on_device(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """[3, R] float64: token id, its log-probability, 1.0 where the row could be drawn from."""
    chosen = _cuda_path().choose(logits, rows) if logits.is_cuda else None
    return choose_with_torch(logits, rows) if chosen is None else chosen


class KernelPath:
    """The Triton kernel (sampling_kernel.py), trusted only once it has chosen as the torch path here.

    Its first CHECKS calls are also computed the torch way and compared (as a CUDA graph's first replay
    is checked against the eager step): every row's success, every greedy row's token, the log-probability
    of each token both chose, and all but an eighth of the sampled rows' tokens (a tie at the top-p cut
    or two race values a rounding apart may draw differently; a wrong kernel differs nearly everywhere).
    A failure or an error turns the kernel off for good, logged: the torch path costs speed, never a token.
    """

    CHECKS = 8

    def __init__(self, module) -> None:
        self.module = module  # None: no Triton here
        self.checks_left = self.CHECKS
        self.sampled = self.differing = 0

    def choose(self, logits: torch.Tensor, rows: RowParams) -> torch.Tensor | None:
        """choose_on_device's result by the kernel; None where the torch path must answer."""
        if self.module is None:
            return None
        try:
            chosen = self.module.choose(_penalize_repeats(logits, rows), rows)
            if self.checks_left:
                chosen = self._checked(chosen, choose_with_torch(logits, rows), rows)
            return chosen
        except Exception:  # a kernel that fails to build or to run must cost speed, never a request
            log.exception("the sampling kernel failed; choosing tokens with plain torch ops from now on")
            self.module = None
            return None

    def _checked(self, chosen: torch.Tensor, reference: torch.Tensor, rows: RowParams) -> torch.Tensor:
        self.checks_left -= 1
        (tokens, logprobs, ok), (want_tokens, want_logprobs, want_ok) = chosen.tolist(), reference.tolist()
        sampled = rows.sample.tolist()
        same = [a == b for a, b in zip(tokens, want_tokens)]
        self.sampled += sum(sampled)
        self.differing += sum(1 for s, eq, good in zip(sampled, same, want_ok) if s and good and not eq)
        faults = []
        if ok != want_ok:
            faults.append("rows that can be drawn from")
        if any(not s and good and not eq for s, eq, good in zip(sampled, same, want_ok)):
            faults.append("greedy tokens")
        # Loose: a tie at the top-p cut, which the kernel keeps whole, changes the kept mass a little (bf16
        # logits of a 128k vocabulary tie in groups of a hundred); a wrong kernel is off by far more.
        if any(eq and good and abs(a - b) > 1e-2 for eq, good, a, b in zip(same, want_ok, logprobs, want_logprobs)):
            faults.append("log-probabilities")
        if self.differing > max(1, self.sampled // 8):
            faults.append(f"sampled tokens ({self.differing} of {self.sampled})")
        if faults:
            raise RuntimeError(f"the sampling kernel differs from the torch path in its {', '.join(faults)}")
        return chosen


_CUDA_PATH: list[KernelPath] = []


def load_kernels() -> None:
    """Import the CUDA path's kernels now (their first use would; without Triton, the torch path)."""
    _cuda_path()


def _cuda_path() -> KernelPath:
    if not _CUDA_PATH:
        try:
            from server.engine import sampling_kernel
        except ImportError:  # no Triton here: the torch path is the same choice
            sampling_kernel = None
        _CUDA_PATH.append(KernelPath(sampling_kernel))
    return _CUDA_PATH[0]


def choose_with_torch(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """choose_on_device's definition, in plain torch ops (every device)."""
    bad = (torch.isnan(logits) | (logits == float("inf"))).any(dim=-1)  # [R]
    logits = _penalize_repeats(logits, rows)
    greedy_token = logits.argmax(dim=-1)  # [R]
    greedy_logprob = torch.log_softmax(logits, dim=-1).gather(-1, greedy_token[:, None])[:, 0]
    token, logprob = greedy_token, greedy_logprob
    if rows.any_sample:
        probs = torch.softmax(_warp(logits / rows.temperature, rows), dim=-1)  # [R, V]
        drawn = (probs / _exponentials(rows.key, logits.shape[-1])).argmax(dim=-1)  # [R]
        drawn_logprob = probs.gather(-1, drawn[:, None])[:, 0].clamp_min(1e-30).log()
        token = torch.where(rows.sample, drawn, greedy_token)
        logprob = torch.where(rows.sample, drawn_logprob, greedy_logprob)
    ok = ~bad & torch.isfinite(logprob)
    return torch.stack([token.double(), logprob.double(), ok.double()])


def _penalize_repeats(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """CTRL's penalty on every id a row has seen; rows with penalty 1 come out unchanged bit for bit."""
    if rows.seen is None:
        return logits
    seen = logits.gather(1, rows.seen)  # [R, L]
    penalized = torch.where(seen > 0, seen / rows.penalty, seen * rows.penalty)
    return logits.scatter(1, rows.seen, penalized)  # repeated ids write the same value


def _warp(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Top-k (ties at the k-th value kept), then top-p over what is left (the token crossing p kept)."""
    if not rows.any_warp:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)  # [R, V]
    k = torch.where(rows.top_k > 0, rows.top_k, logits.shape[-1]).clamp_max(logits.shape[-1])  # [R, 1]
    kth = ordered.gather(1, k - 1)  # [R, 1]
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill((before >= rows.top_p) & (rows.top_p < 1.0), float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def _exponentials(key: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, V] Exp(1) draws, a pure function of each row's key and the token id."""
    ids = torch.arange(vocab, device=key.device, dtype=torch.long)[None, :]
    bits = _mix(key + ids * _GOLDEN)  # [R, V]
    uniform = (_shift_right(bits, 40).float() + 0.5) * (1.0 / 2**24)  # (0, 1): never 0 nor 1
    return -torch.log(uniform)


def _row_key(seed: int, draws: int) -> int:
    """A row's key for its next draw (host side: plain Python integers, wrapped to signed 64 bits)."""
    return _mix_int((seed * 0x9E3779B97F4A7C15 + draws * 0xD1B54A32D192ED03) & (2**64 - 1))


def _mix_int(z: int) -> int:
    mask = 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (multiplication wraps; shifts made logical)."""
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)  # >> is arithmetic on signed ints: drop the sign fill


def _seen_ids(seqs: list, device) -> torch.Tensor:
    """[R, L] each row's prompt + generated ids, padded with its own first id (a no-op to penalize twice)."""
    ids = [seq.prompt_ids + seq.generated for seq in seqs]
    width = max(len(row) for row in ids)
    padded = torch.tensor([row + [row[0]] * (width - len(row)) for row in ids], dtype=torch.long)
    return to_device(padded, device)
