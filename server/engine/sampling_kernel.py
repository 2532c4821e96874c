"""Every row's token choice as a few Triton launches: the CUDA path of sampling.choose_on_device.

Eagerly the choice is some forty kernels over [R, V] tensors (a 64-bit hash, a full sort for top-p, a
softmax, a cumsum, a scatter): at 64 rows of a 128k vocabulary that is more than a millisecond a step,
the whole gap between sampled and greedy decoding. Here nothing of size V is ever stored: each launch
reads the logits from L2 and writes a few numbers per program.

The arithmetic is sampling.py's, defined there; what differs is how top-k and top-p find their cut.
Instead of sorting, each searches for a threshold on the logits' order: the least t for which the
weight strictly above t is below a bound (top-k: a count under k; top-p: a mass under top_p). That
weight only falls as t rises, so a 16-way search over the 2^32 ordered float keys settles it in eight
passes. The tokens kept are those at or above the threshold, so ties at the cut are all kept (a sort
keeps an arbitrary subset of them). The draw is the same exponential race, on the same counter-based
random numbers: a seeded request draws the same tokens on either path, up to float rounding of two
nearly equal race values.

Each row is split over several programs (`splits`), so that even one row keeps the GPU's SMs busy: one
program per row read 128k logits a dozen times from one SM, a millisecond a step whatever the batch
(bench/results/gpu-2026-12-01-fast-path-3/call1_sampling_bench.log). A pass's programs write partial sums; the
next launch's programs each add up their row's partials (in a fixed order, so every program agrees) and
narrow the search themselves, and the first program of a row records the narrowed range for the launch
after. Launches on one stream run in order, so that is all the synchronization it needs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 1024  # logits per load within a program's span
WAYS = 16  # thresholds tried per pass of a search
PASSES = 8  # 16^8 = 2^32: enough to narrow any range of float keys to one
MAX_SPLITS = 256  # programs per row at most (partials are summed as one vector of this length)
PROGRAMS_PER_SM = 2  # how many programs the launch aims at: rows × splits ≈ this × the SMs
NUM_WARPS = 4
# A search pass keeps WAYS sums per lane ([SEARCH_BLOCK, WAYS] floats in registers). At BLOCK (1024) over 4 warps
# that took all 255 registers of a thread and spilled (ptxas -v for sm_90: 432 bytes of spill stores), so at most
# two programs fit on an SM; 256 over 8 warps takes 64 registers and spills nothing (tests/test_kernels_compile.py).
SEARCH_BLOCK = 256
SEARCH_WARPS = 8
_KEY_OF_MINUS_INF = -2139095041  # the ordered key of -inf (below every other non-NaN float)
_STATS = 5  # per program of the first launch: max, its first id, softmax max, softmax sum, bad (the kernels' layout)
_RACE = 4  # per program of the race: best race value, its id, its weight, the kept mass


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


@triton.jit(do_not_specialize=["vocab", "span", "splits"])
def _stats(logits, stride, temperature, t_stride, stats, vocab, span, splits, BLOCK: tl.constexpr):
    """Launch 1, every row: the greedy choice (first maximum) of this program's span, the softmax sum
    relative to the span's maximum, and whether it holds NaN or +inf. (`temperature` is unread here: the
    launches share their first arguments.)"""
    r = tl.program_id(0)
    s = tl.program_id(1)
    row = logits + r.to(tl.int64) * stride
    # Each lane (an offset within BLOCK) keeps its own running results; lanes are combined once at the end.
    lane = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], dtype=tl.int32)
    m = tl.full([BLOCK], -3.4028234663852886e38, tl.float32)  # finite: exp(m - m_new) of an all -inf lane is 0
    total = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    start = s * span
    end = tl.minimum(start + span, vocab)
    while start < end:
        ids = start + lane
        x = tl.load(row + ids, mask=ids < end, other=float("-inf"))
        bad += ((x != x) | (x == float("inf"))).to(tl.int32)
        best_id = tl.where(x > best, ids, best_id)  # strictly: each lane keeps its first maximum
        best = tl.maximum(best, x)
        m_new = tl.maximum(m, x)
        total = total * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
        start += BLOCK
    span_best = tl.max(best)
    span_m = tl.max(m)
    out = stats + (r * splits + s) * 5
    tl.store(out, span_best)
    tl.store(out + 1, tl.min(tl.where(best == span_best, best_id, vocab)).to(tl.float32))  # exact below 2^24
    tl.store(out + 2, span_m)
    tl.store(out + 3, tl.sum(total * tl.exp(m - span_m)))
    tl.store(out + 4, tl.sum(bad).to(tl.float32))


@triton.jit
def _row_stats(stats, r, vocab, splits, MAX_SPLITS: tl.constexpr):
    """A row's first-launch results combined over its programs: (max, its first id, softmax max, softmax
    sum, bad), each as one number, in the same order in every program that asks."""
    s = tl.arange(0, MAX_SPLITS)
    live = s < splits
    at = stats + (r * splits + s) * 5
    best = tl.load(at, mask=live, other=float("-inf"))
    row_best = tl.max(best)
    best_id = tl.min(tl.where(live & (best == row_best), tl.load(at + 1, mask=live, other=0.0), vocab))
    m = tl.load(at + 2, mask=live, other=-3.4028234663852886e38)
    row_m = tl.max(m)
    total = tl.sum(tl.where(live, tl.load(at + 3, mask=live, other=0.0) * tl.exp(m - row_m), 0.0))
    bad = tl.sum(tl.load(at + 4, mask=live, other=0.0))
    return row_best, best_id, row_m, total, bad


@triton.jit
def _narrowed(lo, hi, part, r, bound_of, splits, by_mass, WAYS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """[lo, hi] after the pass whose per-program sums `part` ([rows, splits, WAYS + 1]: the weight above
    each try, then the live weight) counted this row: the least try at which the weight above falls below
    the bound (top-p: bound_of × the live mass; top-k: bound_of itself), and the try before it."""
    ways = tl.arange(0, WAYS)
    s = tl.arange(0, MAX_SPLITS)
    at = part + (r * splits + s)[:, None] * (WAYS + 1) + ways[None, :]
    above = tl.sum(tl.load(at, mask=(s < splits)[:, None], other=0.0), axis=0)  # [WAYS]
    live = tl.sum(tl.load(part + (r * splits + s) * (WAYS + 1) + WAYS, mask=s < splits, other=0.0))
    bound = tl.where(by_mass != 0, bound_of * live, bound_of)
    tries = lo + ((hi - lo) * (ways + 1)) // WAYS  # ascending; the last is hi
    first = tl.min(tl.where(above < bound, ways, WAYS))  # the predicate holds from `first` on
    new_hi = tl.sum(tl.where(ways == first, tries, 0))
    new_lo = tl.where(first > 0, tl.sum(tl.where(ways == first - 1, tries, 0)) + 1, lo)
    return tl.where(lo < hi, new_lo, lo), tl.where(lo < hi, new_hi, hi)


@triton.jit(do_not_specialize=["vocab", "span", "splits", "rows", "index", "by_mass", "has_prior"])
def _search_pass(
    logits, stride, temperature, t_stride, stats, limit, l_stride, state, part, prior, prior_part, prior_limit,
    pl_stride, vocab, span, splits, rows, index, by_mass, has_prior,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, MAX_SPLITS: tl.constexpr, KEY_OF_MINUS_INF: tl.constexpr,
):  # fmt: skip
    """Pass `index` of a threshold search (top-k by count, or top-p by mass: by_mass): narrow the row's
    range by the previous pass's sums (pass 0: set it up), then sum this span's weight above each try.

    state [PASSES, rows, 3] int64: (lo, hi, floor) at the start of each pass; `limit` is k or top_p. A row
    not searched (greedy, no such cut) has lo = hi = floor and adds nothing. `prior`/`prior_part`: the
    top-k search's last pass, whose cut is the floor of a top-p search that follows one (has_prior), and
    its k (`prior_limit`). The flags are runtime arguments, not constants: each constant's value would be
    one more compile at start-up."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.load(temperature + r * t_stride)
    bound_of = tl.load(limit + r * l_stride).to(tl.float32)
    row_state = state + (index * rows + r) * 3
    _, _, m, _, _ = _row_stats(stats, r, vocab, splits, MAX_SPLITS)
    m_s = m / t
    if index == 0:
        floor = tl.full([], KEY_OF_MINUS_INF, tl.int64)
        if has_prior != 0:  # the top-k cut: the prior search's range after its last pass
            at = prior + r * 3
            k = tl.load(prior_limit + r * pl_stride).to(tl.float32)
            floor, _hi = _narrowed(tl.load(at), tl.load(at + 1), prior_part, r, k, splits, 0, WAYS, MAX_SPLITS)
        active = tl.where(by_mass != 0, bound_of < 1.0, (bound_of > 0.0) & (bound_of < vocab))
        lo = floor
        hi = tl.where(active, _ordered(m_s), floor)
    else:
        before = state + ((index - 1) * rows + r) * 3
        floor = tl.load(before + 2)
        last = part + (index - 1) * rows * splits * (WAYS + 1)
        lo, hi = _narrowed(tl.load(before), tl.load(before + 1), last, r, bound_of, splits, by_mass, WAYS, MAX_SPLITS)
    if s == 0:
        tl.store(row_state, lo)
        tl.store(row_state + 1, hi)
        tl.store(row_state + 2, floor)
    ways = tl.arange(0, WAYS)
    # Keys, tries and the range fit 32 bits (only the tries' arithmetic needs 64): the per-way comparisons, the
    # loop's hottest work, run on 32-bit integers.
    tries = (lo + ((hi - lo) * (ways + 1)) // WAYS).to(tl.int32)
    floor32 = floor.to(tl.int32)
    # Every per-logit value is a [SEARCH_BLOCK, 1] column, never a vector: in the [SEARCH_BLOCK, WAYS] tile's own
    # layout, so the comparison with the tries needs no layout conversion. As vectors they went through shared
    # memory every iteration: 132 instructions, 22 of them shared-memory accesses or barriers, against 73 and none
    # (sm_90; tests/test_kernels_compile.py reads the compiled loop).
    above = tl.zeros([BLOCK, WAYS], dtype=tl.float32)  # per lane: summed across lanes once, after the span
    live_weight = tl.zeros([BLOCK, 1], dtype=tl.float32)
    start = s * span
    end = tl.where(lo < hi, tl.minimum(start + span, vocab), start)  # a settled range needs no sums
    while start < end:
        ids = start + tl.arange(0, BLOCK)[:, None]
        x = tl.load(logits + r.to(tl.int64) * stride + ids, mask=ids < end, other=float("-inf"))
        key = _ordered(x / t).to(tl.int32)
        live = (ids < end) & (key >= floor32)
        w = tl.where(live, tl.where(by_mass != 0, tl.exp(x / t - m_s), 1.0), 0.0)  # top-k counts
        above += tl.where(key > tries[None, :], w, 0.0)
        live_weight += w
        start += BLOCK
    out = part + ((index * rows + r) * splits + s) * (WAYS + 1)
    tl.store(out + ways, tl.sum(above, axis=0))
    tl.store(out + WAYS, tl.sum(live_weight))


@triton.jit(do_not_specialize=["vocab", "span", "splits", "has_cut", "by_mass"])
def _race(
    logits, stride, temperature, t_stride, stats, keys, key_stride, sample, limit, l_stride, cut_state, cut_part,
    race, vocab, span, splits, has_cut, by_mass,
    BLOCK: tl.constexpr, WAYS: tl.constexpr, MAX_SPLITS: tl.constexpr, KEY_OF_MINUS_INF: tl.constexpr,
):  # fmt: skip
    """The exponential race among the kept tokens of this span, for sampled rows: the best p_j / E_j,
    its id and weight, and the span's kept mass. The cut (has_cut) is the last search's range after its
    last pass, from that pass's state and sums and its `limit` (top-p, by_mass; else top-k)."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    out = race + (r * splits + s) * 4
    t = tl.load(temperature + r * t_stride)
    floor = tl.full([], KEY_OF_MINUS_INF, tl.int64)
    if has_cut != 0:
        at = cut_state + r * 3
        bound_of = tl.load(limit + r * l_stride).to(tl.float32)
        floor, _hi = _narrowed(tl.load(at), tl.load(at + 1), cut_part, r, bound_of, splits, by_mass, WAYS, MAX_SPLITS)
    _, _, m, _, _ = _row_stats(stats, r, vocab, splits, MAX_SPLITS)
    m_s = m / t
    key = tl.load(keys + r * key_stride)
    won = tl.full([BLOCK], -1.0, tl.float32)  # per lane: its best race value, that token and its weight
    won_ids = tl.zeros([BLOCK], dtype=tl.int32)
    won_weights = tl.zeros([BLOCK], dtype=tl.float32)
    kept = tl.zeros([BLOCK], dtype=tl.float32)
    start = s * span
    end = tl.where(tl.load(sample + r).to(tl.int32) != 0, tl.minimum(start + span, vocab), start)
    while start < end:
        ids = start + tl.arange(0, BLOCK)
        x = tl.load(logits + r.to(tl.int64) * stride + ids, mask=ids < end, other=float("-inf"))
        weight = tl.where((ids < end) & (_ordered(x / t) >= floor), tl.exp(x / t - m_s), 0.0)
        kept += weight
        value = tl.where(ids < end, weight / _exponentials(key, ids), -1.0)
        wins = value > won  # strictly: each lane keeps its first maximum
        won_ids = tl.where(wins, ids, won_ids)
        won_weights = tl.where(wins, weight, won_weights)
        won = tl.maximum(won, value)
        start += BLOCK
    best = tl.max(won)
    winner = won == best
    won_id = tl.min(tl.where(winner, won_ids, vocab))
    tl.store(out, best)
    tl.store(out + 1, won_id.to(tl.float32))
    tl.store(out + 2, tl.sum(tl.where(winner & (won_ids == won_id), won_weights, 0.0)))  # one lane holds it
    tl.store(out + 3, tl.sum(kept))


@triton.jit(do_not_specialize=["rows", "vocab", "splits"])
def _finish(
    stats, sample, race, out, rows, vocab, splits, MAX_SPLITS: tl.constexpr,
):  # fmt: skip
    """One program per row: its token, log-probability and ok flag from the launches before."""
    r = tl.program_id(0)
    best, best_id, m, total, bad = _row_stats(stats, r, vocab, splits, MAX_SPLITS)
    token = best_id
    logprob = -tl.log(total)  # log_softmax at the maximum
    if tl.load(sample + r).to(tl.int32) != 0:  # (`race` is only read for sampled rows)
        s = tl.arange(0, MAX_SPLITS)
        live = s < splits
        at = race + (r * splits + s) * 4
        won = tl.load(at, mask=live, other=-2.0)
        winner = live & (won == tl.max(won))
        ids = tl.load(at + 1, mask=live, other=0.0)
        token = tl.min(tl.where(winner, ids, vocab))
        weight = tl.sum(tl.where(winner & (ids == token), tl.load(at + 2, mask=live, other=0.0), 0.0))
        kept_mass = tl.sum(tl.load(at + 3, mask=live, other=0.0))
        logprob = tl.log(tl.maximum(weight / kept_mass, 1e-30))
    finite = (logprob == logprob) & (tl.abs(logprob) < float("inf"))
    ok = (bad == 0) & finite
    tl.store(out + r, tl.minimum(tl.maximum(token, 0), vocab - 1).to(tl.float64))  # in range even when not ok
    tl.store(out + rows + r, logprob.to(tl.float64))
    tl.store(out + 2 * rows + r, ok.to(tl.float64))


def splits(rows: int, vocab: int, programs: int) -> tuple[int, int]:
    """(programs per row, logits per program: a multiple of BLOCK) for about `programs` in all."""
    blocks = triton.cdiv(vocab, BLOCK)
    per_row = max(1, min(MAX_SPLITS, programs // max(rows, 1), blocks))
    span = triton.cdiv(blocks, per_row) * BLOCK
    return triton.cdiv(vocab, span), span


@functools.cache
def _programs(device: torch.device) -> int:
    """How many programs a launch aims at on `device` (asked once per device, not per step)."""
    if device.type != "cuda":
        return 4  # Triton's interpreter: a few programs per row, as on a GPU, but few to run one by one
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def choose(logits: torch.Tensor, rows, *, programs: int | None = None) -> torch.Tensor:
    """[3, R] float64 (token, logprob, ok) for logits [R, V] float32 and sampling.RowParams `rows`
    (repetition penalty already applied). `programs`: how many programs to aim at (default: the GPU's)."""
    logits = logits.contiguous()
    count, vocab = logits.shape
    per_row, span = splits(count, vocab, programs or _programs(logits.device))
    f32 = dict(dtype=torch.float32, device=logits.device)
    stats = torch.empty(count, per_row, _STATS, **f32)
    out = torch.empty(3, count, dtype=torch.float64, device=logits.device)
    temperature, sample = rows.temperature, rows.sample.contiguous()
    common = (logits, logits.stride(0), temperature, temperature.stride(0), stats)
    _stats[(count, per_row)](*common, vocab, span, per_row, BLOCK=BLOCK, num_warps=NUM_WARPS)
    race = stats  # unread where no row samples
    if rows.any_sample:
        consts = dict(WAYS=WAYS, MAX_SPLITS=MAX_SPLITS, KEY_OF_MINUS_INF=_KEY_OF_MINUS_INF)
        # The cut the race draws within: the last search's, top-p after top-k. Without one, a stand-in of the
        # same types (both branches of _race compile) that no row reads.
        cut, limit, by_mass = (torch.empty(count, 3, dtype=torch.int64, device=logits.device), stats), rows.top_k, 0
        if rows.any_top_k:
            cut, limit = _search(common, rows.top_k, rows, span, per_row, by_mass=False, consts=consts), rows.top_k
        if rows.any_top_p:
            prior = cut if rows.any_top_k else None
            cut = _search(common, rows.top_p, rows, span, per_row, by_mass=True, consts=consts, prior=prior)
            limit, by_mass = rows.top_p, 1
        race = torch.empty(count, per_row, _RACE, **f32)
        _race[(count, per_row)](
            *common, rows.key, rows.key.stride(0), sample, limit, limit.stride(0), *cut, race, vocab, span, per_row,
            int(rows.any_top_k or rows.any_top_p), by_mass, BLOCK=BLOCK, num_warps=NUM_WARPS, **consts,
        )  # fmt: skip
    _finish[(count,)](
        stats, sample, race, out, count, vocab, per_row, MAX_SPLITS=MAX_SPLITS, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _search(common, limit, rows, span, per_row, *, by_mass: bool, consts: dict, prior=None):
    """The PASSES launches of one threshold search over `limit` (rows.top_k or rows.top_p): its last pass's
    (state [R, 3], sums [R, S, WAYS + 1]), which give its cut. `prior`: the top-k search's, likewise."""
    logits = common[0]
    count, vocab = logits.shape
    state = torch.empty(PASSES, count, 3, dtype=torch.int64, device=logits.device)
    part = torch.empty(PASSES, count, per_row, WAYS + 1, dtype=torch.float32, device=logits.device)
    prior_state, prior_part = prior if prior is not None else (state[0], part[0])  # (unread without a prior)
    for index in range(PASSES):
        _search_pass[(count, per_row)](
            *common, limit, limit.stride(0), state, part, prior_state, prior_part, rows.top_k, rows.top_k.stride(0),
            vocab, span, per_row, count, index, int(by_mass), int(prior is not None), BLOCK=SEARCH_BLOCK,
            num_warps=SEARCH_WARPS, **consts,
        )  # fmt: skip
    return state[-1], part[-1]
