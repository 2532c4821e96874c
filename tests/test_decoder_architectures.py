"""Our decoder against transformers' own forward pass, on small random models of each architecture the
server accepts (tier a): the same logits after a prompt (chunked prefill) and after a decode step."""

from __future__ import annotations

import pytest
import torch

from server.engine.decoder import Chunk, Step
from server.engine.runner import ModelRunner
from tests.steps import prompt_step

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=256,
)


def configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    return {
        "llama": LlamaConfig(**SMALL),
        "llama3-rope-scaling": LlamaConfig(**SMALL, rope_parameters=llama3_rope),
        "llama-attention-bias": LlamaConfig(**SMALL, attention_bias=True),
        "mistral": MistralConfig(**SMALL, sliding_window=None),
        "qwen2": Qwen2Config(**SMALL),  # q/k/v biases
    }


@pytest.mark.parametrize("name", list(configs()))
def test_decoder_matches_transformers(name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs()[name]).eval()
    with torch.no_grad():
        for param in model.parameters():  # the default init is too small to tell a wrong layer from noise
            param.normal_(0, 0.2)
    runner = ModelRunner(model, None, backend="transformers", max_context=64, kv_slots=2, adapter_slots=1)
    ids = torch.randint(0, 256, (40,)).tolist()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].float()  # [S, V]

    prefill = runner.decoder.forward(prompt_step(ids[:-1]))[0]  # one chunk over slot 0
    torch.testing.assert_close(prefill, reference[-2], rtol=1e-4, atol=1e-4)
    runner.cache.used = 1
    runner.cache.last_token[0] = ids[-1]  # a decode row's input: the token its slot drew last
    longs = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    decode = Step(
        ids=longs([ids[-1]]),
        positions=longs([39]),
        write_slots=longs([0]),
        write_positions=longs([39]),
        lora_slots=longs([-1]),
        decode_rows=1,
        decode_lengths=longs([40]),
        decode_span=40,
        chunks=[],
        logit_rows=longs([0]),
        any_adapter=False,
    )
    torch.testing.assert_close(runner.decoder.forward(decode)[0], reference[-1], rtol=1e-4, atol=1e-4)


def test_unsupported_architectures_are_refused_at_start():
    from transformers import AutoModelForCausalLM, MistralConfig

    model = AutoModelForCausalLM.from_config(MistralConfig(**SMALL, sliding_window=16)).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        ModelRunner(model, None, backend="transformers", max_context=64, kv_slots=1, adapter_slots=1)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="not supported"):
        ModelRunner(model, None, backend="transformers", max_context=64, kv_slots=1, adapter_slots=1)


def test_chunked_prefill_equals_one_chunk():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).eval()
    runner = ModelRunner(model, None, backend="transformers", max_context=64, kv_slots=2, adapter_slots=1)
    ids = torch.randint(0, 256, (30,)).tolist()
    whole = runner.decoder.forward(prompt_step(ids, slot=0))[0]
    first, second = prompt_step(ids[:16], slot=1), prompt_step(ids, slot=1)
    runner.decoder.forward(first)
    tail = Step(
        ids=second.ids[16:],
        positions=second.positions[16:],
        write_slots=second.write_slots[16:],
        write_positions=second.write_positions[16:],
        lora_slots=second.lora_slots[16:],
        decode_rows=0,
        decode_lengths=second.decode_lengths,
        decode_span=0,
        chunks=[Chunk(slot=1, start=16, length=14)],
        logit_rows=torch.tensor([13]),
        any_adapter=False,
    )
    torch.testing.assert_close(runner.decoder.forward(tail)[0], whole, rtol=1e-5, atol=1e-5)
