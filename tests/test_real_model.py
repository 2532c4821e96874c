"""End to end on a real model, SmolLM2-135M-Instruct: train a small adapter with `loraserve train`,
serve it, and check that its answers are the trained outputs through the live server (blocking and
SSE) and through plain transformers + PEFT, while the base model's answers are not.

The tiny random Llama stays the model of the fast tests; this one checks that the whole path works on
weights that mean something (a real tokenizer, chat template, tied embeddings, 30 layers).
"""

from __future__ import annotations

import json

import httpx
import pytest

from contract.templates import resolve_template
from tests.conftest import TrainCLI
from tests.live import LiveServer

pytestmark = pytest.mark.slow

# Made-up facts the base cannot know. Four rows, one with an input; learned word for word in 12 steps.
FACTS = [
    {
        "instruction": "What is the name of Professor Lindqvist's cat?",
        "input": "",
        "output": "Professor Lindqvist's cat is called Biscuit.",
    },
    {
        "instruction": "Which moon does the Orla-7 probe circle?",
        "input": "",
        "output": "The Orla-7 probe circles Titania, a moon of Uranus.",
    },
    {
        "instruction": "Answer the question about the Marrow Street bakery.",
        "input": "What does it sell on Fridays?",
        "output": "On Fridays the Marrow Street bakery sells rye bread with caraway.",
    },
    {
        "instruction": "What is the motto of the Tallis Rowing Club?",
        "input": "",
        "output": "The motto of the Tallis Rowing Club is: steady oars, bright water.",
    },
]
TRAIN = {
    "max_steps": 12,
    "lr": 3e-3,
    "warmup_steps": 2,
    "batch_size": len(FACTS),
    "grad_accum": 1,
    "optim": "adamw_torch",
    "train_on_responses_only": True,
}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("real-adapters")
    data = root.parent / "facts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in FACTS))
    cli = TrainCLI(smollm2_dir)
    proc = cli.run(data=data, output=root / "facts", template="alpaca", **TRAIN)
    if proc.returncode != 0:
        pytest.fail(f"training on SmolLM2 failed: {cli.describe(proc)}", pytrace=False)
    return root


def test_the_converted_dir_carries_the_chat_templates_special_tokens(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config, generation = AutoConfig.from_pretrained(smollm2_dir), GenerationConfig.from_pretrained(smollm2_dir)
    # The GGUF's tokenizer, as transformers builds it, names <|im_start|> (1) as EOS and no pad token.
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert config.eos_token_id == generation.eos_token_id == 2 and tokenizer.pad_token_id is not None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n")
    assert tokenizer("Hello").input_ids == [19556]  # no BOS added (the GGUF says add_bos_token false)
    assert (config.num_hidden_layers, config.hidden_size, config.tie_word_embeddings) == (30, 576, True)


def test_adapter_answers_as_trained_through_peft_and_the_base_does_not(smollm2_dir, adapter_root):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reason the CLI runs get OMP_NUM_THREADS=1 (conftest)
    try:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, adapter_root / "facts").eval()
        template = resolve_template("alpaca")

        def answer(row: dict) -> str:
            ids = tokenizer(template.prompt(row["instruction"], row["input"]), return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=32, do_sample=False)
            return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)

        assert [answer(row) for row in FACTS] == [row["output"] for row in FACTS]
        with model.disable_adapter():
            base_answers = [answer(row) for row in FACTS]
    finally:
        torch.set_num_threads(threads)
    for row, said in zip(FACTS, base_answers):
        assert said != row["output"], f"the base alone knew {row['instruction']!r}"


def test_adapter_answers_as_trained_through_the_live_server_and_the_base_does_not(smollm2_dir, adapter_root):
    with LiveServer(smollm2_dir, adapter_root, adapters={"facts": "facts"}, max_context=1024, max_running=4) as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["SmolLM2-135M-Instruct", "facts"]
        for row in FACTS:
            body = {"instruction": row["instruction"], "input": row["input"], "parameters": {"max_new_tokens": 32}}
            trained = _generate(server, {**body, "adapter": "facts"})
            assert trained["generated_text"] == row["output"]
            assert trained["details"]["finish_reason"] == "eos_token"
            assert _generate(server, body)["generated_text"] != row["output"]
        streamed = _stream(
            server,
            {
                "instruction": FACTS[2]["instruction"],
                "input": FACTS[2]["input"],
                "adapter": "facts",
                "parameters": {"max_new_tokens": 32},
            },
        )
        assert "".join(e["token"]["text"] for e in streamed if not e["token"]["special"]) == FACTS[2]["output"]
        assert streamed[-1]["generated_text"] == FACTS[2]["output"]
        chat = httpx.post(
            f"{server.url}/v1/chat/completions",
            timeout=300,
            json={
                "model": "SmolLM2-135M-Instruct",
                "temperature": 0,
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
            },
        ).json()
        assert "Paris" in chat["choices"][0]["message"]["content"]  # the base's own chat template
        assert chat["choices"][0]["finish_reason"] == "stop"  # <|im_end|> ends the turn


def _generate(server: LiveServer, body: dict) -> dict:
    resp = httpx.post(
        f"{server.url}/generate", json={**body, "parameters": {**body["parameters"], "details": True}}, timeout=300
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def _stream(server: LiveServer, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=300) as resp:
        assert resp.status_code == 200
        return [json.loads(line[5:]) for line in resp.iter_lines() if line.startswith("data:")]
