"""Property-based tests (hypothesis) of the pieces every token passes through: the sampler, incremental
UTF-8 detokenizing, stop strings, and the template contract between training and serving.

Each property is checked against a reference written here from its definition, never against the code
under test. CI runs the `ci` profile (tests/conftest.py); a full run: `pytest tests/test_properties.py
--hypothesis-profile=full --hypothesis-show-statistics` (bench/results/, NOTES.md there, has its figures).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from contract.templates import SLOT, PromptTemplate, load_template_file
from server.engine.detokenize import Detokenizer, StopMatcher
from server.engine.sampling import SamplingParams, choose_on_device, row_params
from server.engine.sequence import Sequence

DRAWS = 48  # rows per sampler case: the same logits under as many seeds

# -- the sampler -------------------------------------------------------------------------------------------------

logit_lists = st.lists(
    st.floats(-12, 12, allow_nan=False, width=32), min_size=2, max_size=40, unique=True
)  # unique: top-k's "ties at the k-th value are kept" then never applies


def rows(params: SamplingParams, *, seeds, generated: int = 0) -> list:
    """What row_params reads of a sequence, for one row per seed."""
    return [
        SimpleNamespace(params=params, seed=s, prompt_ids=[0], generated=[0] * generated, in_flight=0) for s in seeds
    ]


def sample_tokens(logits: list[float], params: SamplingParams, seeds) -> list[int]:
    seqs = rows(params, seeds=seeds)
    batch = torch.tensor([logits] * len(seqs), dtype=torch.float32)
    return choose_on_device(batch, row_params(seqs, torch.device("cpu")))[0].long().tolist()


def allowed(logits: list[float], *, temperature: float, top_k: int, top_p: float) -> tuple[set[int], float]:
    """The reference: tokens top-k then top-p may pick (by definition), and their share of top-k's mass."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    kept = order[:top_k] if top_k else order
    probs = torch.softmax(torch.tensor([logits[i] for i in kept], dtype=torch.float64) / temperature, 0).tolist()
    chosen, mass = [], 0.0
    for token, p in zip(kept, probs):
        if mass >= top_p:
            break
        chosen.append(token)
        mass += p
    return set(chosen), mass


@given(logits=logit_lists, k=st.integers(1, 40), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**40))
def test_top_k_draws_only_among_the_k_largest(logits, k, temperature, seed):
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=temperature, top_k=k)
    drawn = set(sample_tokens(logits, params, range(seed, seed + DRAWS)))
    top, _ = allowed(logits, temperature=temperature, top_k=k, top_p=1.0)
    assert len(top) <= k and drawn <= top, (drawn, top)


@given(
    logits=logit_lists,
    p=st.floats(0.05, 0.99),
    temperature=st.floats(0.3, 3.0),
    k=st.integers(0, 40),
    seed=st.integers(0, 2**40),
)
def test_top_p_keeps_at_least_p_of_the_mass_and_no_more_tokens_than_that_needs(logits, p, temperature, k, seed):
    top, mass = allowed(logits, temperature=temperature, top_k=k, top_p=p)
    assume(mass - p > 1e-4)  # a mass within float error of p: which side it falls on is rounding, not top-p
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=temperature, top_p=p, top_k=k)
    drawn = set(sample_tokens(logits, params, range(seed, seed + DRAWS)))
    assert mass >= p and drawn <= top, (drawn, top, mass)


@given(logits=logit_lists, seed=st.integers(0, 2**53 - 1), others=st.lists(st.integers(0, 2**53 - 1), max_size=6))
def test_a_seed_draws_the_same_token_whatever_else_is_in_the_batch(logits, seed, others):
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=1.0, top_p=0.9)
    alone = sample_tokens(logits, params, [seed])[0]
    assert sample_tokens(logits, params, [seed])[0] == alone
    assert sample_tokens(logits, params, [*others, seed, *others])[len(others)] == alone


@given(logits=logit_lists)
def test_greedy_is_the_argmax(logits):
    assert sample_tokens(logits, SamplingParams(max_new_tokens=1), [None]) == [
        max(range(len(logits)), key=logits.__getitem__)
    ]


# -- detokenizing and stop strings, with the tiny model's byte-level tokenizer --------------------------------------

# Chinese the tokenizer never saw splits into byte tokens: one character spans 2-3 tokens.
# The rest covers text the tokenizer has merges for (中国 北京 are single tokens), accents and emoji.
TEXT = st.lists(
    st.sampled_from(list("abc xyz.,!\n") + list("鹪鹩港渡轮图书馆龘齉") + ["é", "🙂", "中国", "北京"]), max_size=25
).map("".join)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def streamed(tokenizer, ids: list[int]) -> list[str]:
    detok = Detokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


@given(text=TEXT)
def test_streamed_text_is_the_text_and_never_holds_half_a_character(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_the_text_strategy_does_split_characters_across_tokens(tokenizer):
    """The positive control: unless some character spans tokens, the property above proves nothing."""
    ids = tokenizer.encode("龘", add_special_tokens=False)
    assert len(ids) > 1 and "\ufffd" in tokenizer.decode(ids[:1])


@given(ids=st.lists(st.integers(0, 1023), max_size=30))
def test_any_token_sequence_streams_as_its_whole_decode(tokenizer, ids):
    """Random ids make invalid UTF-8 too: what streams is what decoding all of them at once gives, less an
    incomplete character at the very end."""
    whole = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(streamed(tokenizer, ids)) == whole.rstrip("\ufffd")


def generate(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[str, list[str], str | None]:
    """The engine's own path, token by token: Sequence.accept (detokenizer, then stop strings)."""
    params = SamplingParams(max_new_tokens=max(len(ids), 1), stop=stops)
    seq = Sequence([0], params, None, tokenizer, listener=None)
    pieces, reason = [], None
    for token in ids:
        seq.in_flight += 1
        event, reason = seq.accept(token, 0.0)
        pieces.append(event.text)
        if reason:
            break
    return "".join(pieces), pieces, reason


@given(text=TEXT.filter(lambda t: len(t) >= 2), data=st.data())
def test_a_stop_string_across_tokens_ends_the_text_where_it_begins(tokenizer, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : data.draw(st.integers(start + 1, len(text)))]
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, pieces, reason = generate(tokenizer, ids, (stop,))
    assert out == text[: text.find(stop)] and reason == "stop_sequence"
    assert not any("\ufffd" in piece for piece in pieces)


@given(text=TEXT, stops=st.lists(TEXT.filter(bool), min_size=1, max_size=4))
def test_with_several_stops_no_text_past_one_is_ever_sent(tokenizer, text, stops):
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, _, reason = generate(tokenizer, ids, tuple(stops))
    assert text.startswith(out) and not any(s in out for s in stops)
    if any(s in text for s in stops):
        assert reason == "stop_sequence" and any(text[len(out) :].startswith(s) for s in stops)
    else:
        assert out == text


@given(text=st.text(max_size=60), stops=st.lists(st.text(min_size=1, max_size=6), max_size=4), data=st.data())
def test_stop_matching_does_not_depend_on_how_text_arrives(text, stops, data):
    """Characters fed in any split: the released text is the text before the first stop to complete."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    whole, split = StopMatcher(tuple(stops)), StopMatcher(tuple(stops))
    one_go = whole.feed(text) + whole.flush()
    streamed_text = ""
    for piece in pieces:
        if split.stopped:  # as the engine does: the sequence ends at its stop string
            break
        streamed_text += split.feed(piece)
    streamed_text += split.flush()
    assert split.stopped == whole.stopped == any(s in text for s in stops)
    if len(stops) <= 1:  # one stop string: its earliest occurrence is the first to complete, in any split
        assert streamed_text == one_go == (text[: text.find(stops[0])] if whole.stopped else text)
    assert not any(s in streamed_text for s in stops) and text.startswith(streamed_text)


# -- the template contract ----------------------------------------------------------------------------------------

# No "\r" (a text file's line ends are read as "\n") and no BOM (stripped from a template file on purpose).
free_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\ufeff"), max_size=30)


@st.composite
def templates(draw) -> PromptTemplate:
    head, between, tail = (draw(free_text.filter(lambda t: SLOT not in t)) for _ in range(3))
    assume((head + between + tail).strip())
    return PromptTemplate(name="t", text=head + SLOT + between + SLOT + tail + SLOT)


@given(
    template=templates(),
    instruction=free_text,
    input=free_text,
    output=free_text,
    eos=st.sampled_from(["</s>", "<|im_end|>"]),
)
def test_training_text_round_trips_through_the_serving_prompt(template, instruction, input, output, eos):
    assume(eos not in output)
    prompt = template.prompt(instruction, input)
    training = template.training_text(instruction, input, output, eos)
    assert training.startswith(prompt)  # serving asks with exactly the text training saw before the answer
    assert template.extract_response(training, prompt, eos) == output


@given(template=templates(), as_json=st.booleans())
def test_a_template_file_loads_as_the_text_it_holds(tmp_path_factory, template, as_json):
    import json

    path = tmp_path_factory.mktemp("template") / ("t.json" if as_json else "t.txt")
    if as_json:
        path.write_text(json.dumps({"name": "t", "text": template.text}), encoding="utf-8")
    else:
        path.write_text(template.text + "\n", encoding="utf-8", newline="")
    assert load_template_file(path).text == template.text
