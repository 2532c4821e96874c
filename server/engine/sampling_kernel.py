"""Every row's token choice as one Triton kernel: the CUDA path of sampling.choose_on_device.

Eagerly the choice is some forty kernels over [R, V] tensors (a 64-bit hash, a full sort for top-p, a
softmax, a cumsum, a scatter): at 64 rows of a 128k vocabulary that is more than a millisecond a step,
the whole gap between sampled and greedy decoding. Here one program per row reads the row's logits a
few times from L2 and writes three numbers; nothing of size V is ever stored.

The arithmetic is sampling.py's, defined there; what differs is how top-k and top-p find their cut.
Instead of sorting, each searches for a threshold on the logits' order: the least t for which the
weight strictly above t is below a bound (top-k: a count under k; top-p: a mass under top_p). That
weight only falls as t rises, so an 8-way search over the 2^32 ordered float keys settles it in
eleven passes. Eight ways, because a pass is bound by its compares per element, not by its reads,
and a row is one SM's work. The tokens kept are those at or above the threshold, so ties at the cut
are all kept (a sort keeps an arbitrary subset of them). The draw is the same exponential race, on
the same counter-based random numbers: a seeded request draws the same tokens on either path, up to
float rounding of two nearly equal race values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # logits per load: [BLOCK, WAYS] compares per step of a search
WAYS = 8  # thresholds tried per pass of a search: 2^32 keys in 11 passes
NUM_WARPS = 8  # a row's program: BLOCK × WAYS running sums over its threads
_KEY_OF_MINUS_INF = -2139095041  # the ordered key of -inf (below every other non-NaN float)


@triton.jit
def _ordered(x):
    """Float32 → int64 keys in the floats' order (negative floats' bits flipped; -0.0 is 0.0 first)."""
    bits = (x + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _exponentials(key, ids):
    """Exp(1) draws from SplitMix64 of (row key + id × golden), as sampling._exponentials."""
    z = key.to(tl.uint64, bitcast=True) + ids.to(tl.uint64) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    uniform = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(uniform)


@triton.jit
def _least_threshold(
    row,
    vocab: tl.constexpr,
    t,
    m_s,
    floor,
    lo,
    hi,
    bound,
    BY_MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    WAYS: tl.constexpr,
):
    """The least key t in [lo, hi] with sum(w_j : key_j > t, key_j >= floor) < bound, where w_j is
    exp(s_j - m_s) (BY_MASS) or 1. The sum at hi is 0, so the answer exists; each pass narrows
    [lo, hi] WAYS-fold."""
    ways = tl.arange(0, WAYS)
    while lo < hi:
        tries = lo + ((hi - lo) * (ways + 1)) // WAYS  # ascending; the last is hi
        above = tl.zeros([BLOCK, WAYS], dtype=tl.float32)  # per lane: summed across lanes once, after the pass
        for start in range(0, vocab, BLOCK):
            ids = start + tl.arange(0, BLOCK)
            s = tl.load(row + ids, mask=ids < vocab, other=float("-inf")) / t
            key = _ordered(s)
            live = (ids < vocab) & (key >= floor)
            if BY_MASS:
                w = tl.where(live, tl.exp(s - m_s), 0.0)
            else:
                w = tl.where(live, 1.0, 0.0)
            above += tl.where(key[:, None] > tries[None, :], w[:, None], 0.0)
        above = tl.sum(above, axis=0)
        first = tl.min(tl.where(above < bound, ways, WAYS))  # the predicate holds from `first` on
        new_hi = tl.sum(tl.where(ways == first, tries, 0))
        below = tl.sum(tl.where(ways == first - 1, tries, 0)) + 1
        lo = tl.where(first > 0, below, lo)
        hi = new_hi
    return lo


@triton.jit
def _choose(
    logits, stride, temperature, t_stride, top_p, p_stride, top_k, k_stride, keys, key_stride, sample, out,
    rows, vocab: tl.constexpr, BLOCK: tl.constexpr, WAYS: tl.constexpr, KEY_OF_MINUS_INF: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    row = logits + r.to(tl.int64) * stride
    t = tl.load(temperature + r * t_stride)
    # Pass 1: the greedy choice (first maximum), the raw and the tempered softmax's sums, NaN or +inf.
    # Each lane (an offset within BLOCK) keeps its own running results; lanes are combined once at the end,
    # not after every block: a reduction across the program's threads costs more than the block's loads.
    lane = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], dtype=tl.int32)
    m = tl.full([BLOCK], -1.0e30, tl.float32)  # finite: (m - m_new) / t must not overflow on the first block
    total = tl.zeros([BLOCK], dtype=tl.float32)
    total_s = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        ids = start + lane
        x = tl.load(row + ids, mask=ids < vocab, other=float("-inf"))
        bad += ((x != x) | (x == float("inf"))).to(tl.int32)
        best_id = tl.where(x > best, ids, best_id)  # strictly: each lane keeps its first maximum
        best = tl.maximum(best, x)
        m_new = tl.maximum(m, x)
        total = total * tl.exp(m - m_new) + tl.exp(x - m_new)
        total_s = total_s * tl.exp((m - m_new) / t) + tl.exp((x - m_new) / t)
        m = m_new
    row_best = tl.max(best)
    best_id = tl.min(tl.where(best == row_best, best_id, vocab))  # the first maximum of the row
    row_m = tl.max(m)
    total_s = tl.sum(total_s * tl.exp((m - row_m) / t))
    total = tl.sum(total * tl.exp(m - row_m))
    m = row_m
    bad = tl.sum(bad)
    token = best_id.to(tl.int64)
    logprob = -tl.log(total)  # log_softmax at the maximum
    if tl.load(sample + r).to(tl.int32) != 0:
        m_s = m / t
        hi = _ordered(m_s)
        k = tl.load(top_k + r * k_stride)
        floor = tl.full([], KEY_OF_MINUS_INF, tl.int64)
        mass = total_s
        if (k > 0) & (k < vocab):  # the k-th largest's key: the least t with fewer than k keys above it
            floor = _least_threshold(row, vocab, t, m_s, floor, floor, hi, k.to(tl.float32), False, BLOCK, WAYS)
            lane_mass = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, vocab, BLOCK):
                ids = start + tl.arange(0, BLOCK)
                s = tl.load(row + ids, mask=ids < vocab, other=float("-inf")) / t
                lane_mass += tl.where((ids < vocab) & (_ordered(s) >= floor), tl.exp(s - m_s), 0.0)
            mass = tl.sum(lane_mass)
        p = tl.load(top_p + r * p_stride)
        if p < 1.0:  # the least t with less than top_p of the mass above it
            floor = _least_threshold(row, vocab, t, m_s, floor, floor, hi, p * mass, True, BLOCK, WAYS)
        # The race among the kept tokens: argmax of p_j / E_j, and the kept mass for the drawn one's logprob.
        key = tl.load(keys + r * key_stride)
        won = tl.full([BLOCK], -1.0, tl.float32)  # per lane: its best race value, that token and its weight
        won_ids = tl.zeros([BLOCK], dtype=tl.int32)
        won_weights = tl.zeros([BLOCK], dtype=tl.float32)
        lane_kept = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, vocab, BLOCK):
            ids = start + tl.arange(0, BLOCK)
            s = tl.load(row + ids, mask=ids < vocab, other=float("-inf")) / t
            weight = tl.where((ids < vocab) & (_ordered(s) >= floor), tl.exp(s - m_s), 0.0)
            lane_kept += weight
            race = tl.where(ids < vocab, weight / _exponentials(key, ids), -1.0)
            wins = race > won  # strictly: each lane keeps its first maximum
            won_ids = tl.where(wins, ids, won_ids)
            won_weights = tl.where(wins, weight, won_weights)
            won = tl.maximum(won, race)
        winner = won == tl.max(won)
        won_id = tl.min(tl.where(winner, won_ids, vocab))  # the first maximum of the row
        won_weight = tl.sum(tl.where(winner & (won_ids == won_id), won_weights, 0.0))  # one lane holds it
        kept_mass = tl.sum(lane_kept)
        token = won_id.to(tl.int64)
        logprob = tl.log(tl.maximum(won_weight / kept_mass, 1e-30))
    finite = (logprob == logprob) & (tl.abs(logprob) < float("inf"))
    ok = (bad == 0) & finite
    tl.store(out + r, token.to(tl.float64))
    tl.store(out + rows + r, logprob.to(tl.float64))
    tl.store(out + 2 * rows + r, ok.to(tl.float64))


def choose(logits: torch.Tensor, rows) -> torch.Tensor:
    """[3, R] float64 (token, logprob, ok) for logits [R, V] float32 and sampling.RowParams `rows`
    (repetition penalty already applied)."""
    logits = logits.contiguous()
    count, vocab = logits.shape
    out = torch.empty(3, count, dtype=torch.float64, device=logits.device)
    sample = rows.sample.contiguous()
    _choose[(count,)](
        logits, logits.stride(0),
        rows.temperature, rows.temperature.stride(0), rows.top_p, rows.top_p.stride(0),
        rows.top_k, rows.top_k.stride(0), rows.key, rows.key.stride(0), sample, out, count, vocab=vocab,
        BLOCK=BLOCK, WAYS=WAYS, KEY_OF_MINUS_INF=_KEY_OF_MINUS_INF, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
