"""The split-KV decode attention kernel (server/engine/decode_attention.py) against the SDPA call under a length
mask that it replaces in Decoder._decode_attention, which stays its definition.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET); on the GPU machine the same
tests run it compiled. On CUDA the decoder turns it on by itself (Decoder.use_decode_attention_kernel); here
the tests do. Shapes are small: the interpreter runs each program in Python.
"""

from __future__ import annotations

import pytest
import torch

from server.engine.decoder import Chunk, Step
from tests.test_decoder_architectures import SMALL

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LENGTHS = [45, 1, 17, 32, 40]  # span 45: no multiple of a split; 1: a row riding along; 32: a split's end
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def inputs(heads: int, kv_heads: int, head_dim: int, dtype, *, lengths=LENGTHS, strided: bool = True, cells: int = 50):
    """q [n, Hq, D] (a view into a wider q/k output, as the unfused q/k/v path hands it over, or contiguous, as
    the fused kernel does), K, V [n + 1, Hkv, L, D] with positions past the span, and lengths [n]."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    n = len(lengths)
    width = heads + kv_heads if strided else heads
    q = torch.randn(n, width, head_dim, generator=gen, device=DEVICE).to(dtype)[:, :heads]
    K, V = (torch.randn(n + 1, kv_heads, cells, head_dim, generator=gen, device=DEVICE).to(dtype) for _ in "kv")
    return q, K, V, torch.tensor(lengths, device=DEVICE)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 64), (4, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("split", [None, 32, 64])  # the policy's 16; 32; 64 >= the span: one split, no phase 2
def test_it_is_the_sdpa_call_under_the_length_mask(heads, kv_heads, head_dim, dtype, split):
    from server.engine.decode_attention import decode_attention, reference

    q, K, V, lengths = inputs(heads, kv_heads, head_dim, dtype)
    got = decode_attention(q, K, V, lengths, span=45, split=split)
    assert got.shape == (5, heads * head_dim) and got.dtype == dtype
    torch.testing.assert_close(got.float(), reference(q, K, V, lengths, span=45).float(), **_tolerance(dtype))


@pytest.mark.parametrize("strided", [True, False])
def test_q_is_read_through_its_strides(strided):
    from server.engine.decode_attention import decode_attention, reference

    q, K, V, lengths = inputs(6, 2, 32, torch.float32, strided=strided)
    assert q.is_contiguous() != strided
    got = decode_attention(q, K, V, lengths, span=45)
    torch.testing.assert_close(got, reference(q.contiguous(), K, V, lengths, span=45), **_tolerance(torch.float32))


def test_each_row_sees_exactly_its_length_not_one_position_more_or_less():
    """The comparison above would catch an off-by-one: moving any row's length by one moves its output."""
    from server.engine.decode_attention import decode_attention, reference

    q, K, V, lengths = inputs(4, 2, 16, torch.float32)
    got = decode_attention(q, K, V, lengths, span=45).view(5, -1)
    for shifted in (lengths - 1, lengths + 1):
        wrong = reference(q, K, V, shifted.clamp(1, 45), span=45).view(5, -1)
        moved = (shifted.clamp(1, 45) != lengths).tolist()
        differs = [not torch.allclose(got[i], wrong[i], rtol=1e-3, atol=1e-3) for i in range(5)]
        assert differs == moved


def test_a_row_of_length_one_gets_its_first_value():
    from server.engine.decode_attention import decode_attention

    q, K, V, lengths = inputs(8, 2, 16, torch.float32, lengths=[1, 1, 1])
    got = decode_attention(q, K, V, lengths, span=45).view(3, 2, 4, 16)  # [n, Hkv, G, D]
    torch.testing.assert_close(got, V[:3, :, :1].expand(3, 2, 4, 16))


def test_a_split_of_several_blocks_carries_its_softmax_across_them():
    """Splits of 256 positions over a span of 150: one split, read in blocks of 64 (the last one partial)."""
    from server.engine.decode_attention import decode_attention, reference

    q, K, V, lengths = inputs(4, 2, 16, torch.float32, lengths=[150, 70, 1], cells=160)
    q = q * 4  # peaked softmaxes: a block's scores far above the block before it
    got = decode_attention(q, K, V, lengths, span=150, split=256)
    torch.testing.assert_close(got, reference(q, K, V, lengths, span=150), **_tolerance(torch.float32))


def test_splits_wholly_past_every_length_add_nothing():
    """Span 45 in splits of 16, rows of lengths 1 and 3: the second and third splits of every row are empty."""
    from server.engine.decode_attention import decode_attention, reference

    q, K, V, lengths = inputs(4, 2, 16, torch.bfloat16, lengths=[3, 1])
    got = decode_attention(q, K, V, lengths, span=45, split=16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), reference(q, K, V, lengths, span=45).float(), **_tolerance(torch.bfloat16))


def test_the_split_fills_the_gpu_for_few_rows_and_vanishes_for_many():
    from server.engine.decode_attention import MAX_SPLITS, MIN_SPLIT, PROGRAMS, split_size

    assert split_size(rows=1, kv_heads=8, span=256) == 16  # 8 x 16 = 128 programs instead of SDPA's 8
    assert split_size(rows=1, kv_heads=8, span=4096) == 128  # 8 x 32 = 256
    assert split_size(rows=8, kv_heads=8, span=256) == 64  # 64 x 4 = 256
    assert split_size(rows=64, kv_heads=8, span=256) == 256  # 512 programs without splitting: one split
    for rows in (1, 3, 64):
        for span in (1, 45, 256, 5000, 131072):
            split = split_size(rows=rows, kv_heads=8, span=span)
            splits = -(-span // split)
            # about PROGRAMS (a power-of-2 split may halve it), unless the split is as small or as few as it goes
            assert splits <= MAX_SPLITS
            assert split == MIN_SPLIT or splits == MAX_SPLITS or 2 * rows * 8 * splits >= PROGRAMS


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(8, 2, 64), (4, 4, 16), (6, 2, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trust_check_holds_here(heads, kv_heads, head_dim, dtype):
    from server.engine import decode_attention

    assert decode_attention.supports(head_dim)
    assert decode_attention.matches_sdpa(DEVICE, dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim)


# -- in the decoder ----------------------------------------------------------------------------------------------


@pytest.fixture
def runner():
    """A small random Llama (4 heads over 2 KV heads of 16) with two prompts prefilled into slots 0 and 1."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from server.engine.runner import ModelRunner

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).eval().to(DEVICE)
    with torch.no_grad():
        for param in model.parameters():  # the default init is too small to tell a wrong attention from noise
            param.normal_(0, 0.2)
    runner = ModelRunner(
        model, None, backend="transformers", max_context=64, kv_slots=3, adapter_slots=1, cuda_graphs=False
    )
    runner.decoder.use_decode_attention_kernel(enabled=False)
    for slot, length in ((0, 20), (1, 7)):
        ids = torch.randint(0, 256, (length,)).tolist()
        runner.decoder.forward(_step(ids, [slot] * length, list(range(length)), chunks=[Chunk(slot, 0, length)]))
    runner.cache.used = 3
    runner.cache.last_token[:3] = torch.tensor([5, 6, 7], device=DEVICE)
    return runner


def test_a_decode_step_with_the_kernel_gives_the_sdpa_logits(runner, monkeypatch):
    """Rows of lengths 21 and 8, and slot 2 riding along (length 1, writing the scratch position)."""
    from server.engine import decode_attention

    decoder, scratch = runner.decoder, runner.cache.scratch
    step = _step([0, 0, 0], [0, 1, 2], [20, 7, scratch], positions=[20, 7, 0], lengths=[21, 8, 1])
    with_sdpa = decoder.forward(step)
    launches = _count_launches(monkeypatch, decode_attention)
    assert decoder.use_decode_attention_kernel()
    launches.clear()  # (its check ran the kernel too)
    assert decoder.attention_masks(step) == [None]
    torch.testing.assert_close(decoder.forward(step), with_sdpa, rtol=1e-5, atol=1e-5)
    assert len(launches) == 2  # one per layer


def test_a_step_mixing_decode_rows_and_a_prompt_chunk_with_the_kernel_gives_the_sdpa_logits(runner):
    """The masks' order (decode rows', then each chunk's) holds with the decode rows' left to the kernel,
    eagerly and in the piecewise path (its pieces run eagerly here), which attends between them."""
    from server.engine.piecewise_graphs import PiecewiseGraphs

    decoder = runner.decoder
    step = _step(
        [0, 0, 11, 12, 13, 14, 15], [0, 1, 2, 2, 2, 2, 2], [20, 7, 0, 1, 2, 3, 4],
        lengths=[21, 8], chunks=[Chunk(slot=2, start=0, length=5)], logit_rows=[0, 1, 6],
    )  # fmt: skip
    with_sdpa = decoder.forward(step)
    assert decoder.use_decode_attention_kernel()
    masks = decoder.attention_masks(step)
    assert masks[0] is None and masks[1].shape == (2 * 5, 5)  # the chunk's, its 2 query heads per KV head stacked
    torch.testing.assert_close(decoder.forward(step), with_sdpa, rtol=1e-5, atol=1e-5)
    pieces = PiecewiseGraphs(decoder, capture=False)
    torch.testing.assert_close(pieces.forward(step), with_sdpa, rtol=1e-4, atol=1e-4)  # padded: other GEMM shapes
    assert pieces.enabled


def test_a_kernel_that_differs_from_sdpa_is_not_used(runner, monkeypatch, caplog):
    from server.engine import decode_attention

    monkeypatch.setattr(decode_attention, "matches_sdpa", lambda *args, **kwargs: False)
    assert not runner.decoder.use_decode_attention_kernel()
    assert runner.decoder.decode_kernel is None and "SDPA" in caplog.text


def _tolerance(dtype) -> dict:
    return dict(rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def _count_launches(monkeypatch, module) -> list:
    launches, kernel = [], module.decode_attention
    monkeypatch.setattr(module, "decode_attention", lambda *a, **k: launches.append(1) or kernel(*a, **k))
    return launches


def _step(ids, write_slots, write_positions, *, positions=None, lengths=(), chunks=(), logit_rows=None) -> Step:
    """A step on DEVICE: decode rows first (one per length: row i in slot i), then the chunks' tokens."""
    longs = lambda values: torch.tensor(list(values), dtype=torch.long, device=DEVICE)  # noqa: E731
    return Step(
        ids=longs(ids),
        positions=longs(write_positions if positions is None else positions),
        write_slots=longs(write_slots),
        write_positions=longs(write_positions),
        lora_slots=longs([-1] * len(ids)),
        decode_rows=len(lengths),
        decode_lengths=longs(lengths),
        decode_span=max(lengths, default=0),
        chunks=list(chunks),
        logit_rows=longs(range(len(ids)) if logit_rows is None else logit_rows),
        any_adapter=False,
    )
