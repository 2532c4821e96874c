"""The CUDA sampler (server/engine/sampling_kernel.py) against its definition, sampling.choose_with_torch.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, set by conftest: the same
program, each block op in numpy), so CI checks its logic; on the GPU machine the same tests run it compiled.
Every row must choose the same token as the torch path, with the same log-probability, and fail alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from server.engine.sampling import KernelPath, SamplingParams, choose_with_torch, row_params

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def kernel():
    from server.engine import sampling_kernel

    return sampling_kernel


def seqs_for(params: list[SamplingParams], *, draws: int = 3) -> list:
    """Rows of what row_params reads: each parameter set at a few points of one request's draws."""
    return [
        SimpleNamespace(params=p, seed=11 * i + 5, prompt_ids=[1], generated=[0] * d, in_flight=0)
        for i, p in enumerate(params)
        for d in range(draws)
    ]


def compare(kernel, logits: torch.Tensor, seqs: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch path, kernel) for the same rows, on the CPU."""
    logits = logits.to(DEVICE)
    rows = row_params(seqs, DEVICE)
    return choose_with_torch(logits, rows).cpu(), kernel.choose(logits, rows).cpu()


SAMPLED = [
    SamplingParams(8),
    SamplingParams(8, do_sample=True),
    SamplingParams(8, do_sample=True, top_p=0.9),
    SamplingParams(8, do_sample=True, top_p=0.05),
    SamplingParams(8, do_sample=True, top_k=1),
    SamplingParams(8, do_sample=True, top_k=7),
    SamplingParams(8, do_sample=True, top_k=50, top_p=0.5, temperature=0.7),
    SamplingParams(8, do_sample=True, temperature=2.5, top_p=0.95),
    SamplingParams(8, do_sample=True, temperature=0.05, top_k=100_000),
]


@pytest.mark.parametrize("vocab", [37, 1024, 3001])
def test_every_row_draws_the_torch_paths_token_and_logprob(kernel, vocab):
    seqs = seqs_for(SAMPLED)
    logits = torch.randn(len(seqs), vocab, generator=torch.Generator().manual_seed(vocab)) * 4
    want, got = compare(kernel, logits, seqs)
    assert got[0].tolist() == want[0].tolist()
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].tolist() == want[2].tolist() == [1.0] * len(seqs)


def test_a_row_split_over_many_programs_chooses_as_the_torch_path(kernel):
    """On a GPU each row is split over programs that sum partial results: a tie at the top and a top-p cut
    across their spans, banned tokens in one span, every cut kind."""
    vocab = 4 * kernel.BLOCK + 37  # 5 programs a row
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(8)) * 3
    logits[0, kernel.BLOCK - 3 : kernel.BLOCK + 3] = 9.0  # tied at the top, across two programs' spans
    logits[0, 2 * kernel.BLOCK : 3 * kernel.BLOCK] = float("-inf")  # one program's span banned
    seqs = seqs_for(SAMPLED, draws=1)
    logits = logits.expand(len(seqs), -1).contiguous().to(DEVICE)
    rows = row_params(seqs, DEVICE)
    assert kernel.splits(len(seqs), vocab, programs=len(seqs) * 64) == (5, kernel.BLOCK)
    want, got = choose_with_torch(logits, rows).cpu(), kernel.choose(logits, rows, programs=len(seqs) * 64).cpu()
    assert got[0].tolist() == want[0].tolist()
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert got[2].tolist() == want[2].tolist() == [1.0] * len(seqs)


def test_a_sampled_rows_draws_follow_its_distribution(kernel):
    """Not only the same tokens as the torch path: over many seeds, each token about as often as its
    top-p-renormalized probability says."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -30.0]])
    params = SamplingParams(8, do_sample=True, top_p=0.9)
    seqs = [SimpleNamespace(params=params, seed=s, prompt_ids=[1], generated=[], in_flight=0) for s in range(150)]
    batch = logits.expand(len(seqs), -1).contiguous().to(DEVICE)
    tokens = kernel.choose(batch, row_params(seqs, DEVICE))[0].cpu()
    probs = torch.softmax(logits[0], 0)
    kept = probs[:4] / probs[:4].sum()  # mass above token 3 is 0.87 < 0.9, above token 4 is 0.97
    counts = torch.bincount(tokens.long(), minlength=6).double() / len(seqs)
    assert counts[4:].sum() == 0
    assert (counts[:4] - kept).abs().max() < 0.12, (counts, kept)  # 3 standard errors at 150 draws


def test_ties_and_infinities_choose_as_the_torch_path(kernel):
    vocab = 300
    base = torch.randn(1, vocab, generator=torch.Generator().manual_seed(3))
    tied = base.clone()
    tied[0, 10:20] = 5.0  # ten tokens tied at the top
    masked = base.clone()
    masked[0, ::2] = float("-inf")  # half the vocabulary banned
    sampled = [SamplingParams(8, do_sample=True, top_k=3), SamplingParams(8, do_sample=True, top_p=0.5)]
    params = [SamplingParams(8), *sampled]
    seqs = seqs_for(params, draws=2)
    want, got = compare(kernel, masked.expand(len(seqs), -1), seqs)
    assert got[0].tolist() == want[0].tolist()
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert set(got[0].long().tolist()) <= set(range(1, vocab, 2))  # never a banned token
    want, got = compare(kernel, tied.expand(len(seqs), -1), seqs)
    assert got[0][:4].tolist() == want[0][:4].tolist()  # greedy: the first of the tie; top-k keeps every tie
    # Top-p: a sort keeps an arbitrary part of a tie that crosses p, the search all of it; both draw from it.
    assert set(got[0][4:].long().tolist()) <= set(range(10, 20))


def test_rows_holding_nan_or_plus_infinity_fail_alone(kernel):
    logits = torch.randn(4, 500, generator=torch.Generator().manual_seed(4))
    logits[1, 7] = float("nan")
    logits[2, 300] = float("inf")
    seqs = seqs_for([SamplingParams(8, do_sample=True, top_p=0.9)], draws=4)
    want, got = compare(kernel, logits, seqs)
    assert got[2].tolist() == want[2].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert [got[0][i].item() for i in (0, 3)] == [want[0][i].item() for i in (0, 3)]


def test_the_engine_trusts_the_kernel_after_it_chose_as_the_torch_path(kernel):
    path = KernelPath(kernel)
    seqs = seqs_for(SAMPLED, draws=1)
    for call in range(KernelPath.CHECKS + 1):
        logits = torch.randn(len(seqs), 700, generator=torch.Generator().manual_seed(call)).to(DEVICE)
        chosen = path.choose(logits, row_params(seqs, DEVICE))
        assert chosen is not None and path.module is kernel
    assert path.checks_left == 0


class Broken:
    """A kernel that draws the wrong tokens for sampled rows, or fails outright."""

    def __init__(self, *, raises: bool = False) -> None:
        self.raises = raises

    def choose(self, logits, rows):
        if self.raises:
            raise RuntimeError("no kernel image for this device")
        packed = choose_with_torch(logits, rows)
        packed[0] = torch.where(rows.sample, (packed[0] + 1) % logits.shape[1], packed[0])
        return packed


@pytest.mark.parametrize("module", [Broken(), Broken(raises=True)], ids=["wrong tokens", "raises"])
def test_a_kernel_that_chooses_wrongly_or_fails_is_turned_off_and_the_torch_path_answers(module, caplog):
    path = KernelPath(module)
    seqs = seqs_for(SAMPLED, draws=1)
    logits = torch.randn(len(seqs), 700, generator=torch.Generator().manual_seed(9))
    assert path.choose(logits, row_params(seqs, logits.device)) is None
    assert path.module is None and "choosing tokens with plain torch ops" in caplog.text
    assert path.choose(logits, row_params(seqs, logits.device)) is None  # for good
