"""Chat messages → prompt (server/chat.py): pure units, no model."""

from __future__ import annotations

import pytest

from contract.templates import ALPACA
from server.chat import ChatMessage, parse_messages, render_chat_template, to_alpaca, uses_chat_template
from server.errors import Invalid


def msgs(*pairs: tuple[str, object]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_single_user_message_is_the_instruction_with_empty_input():
    assert to_alpaca(parse_messages(msgs(("user", "What is 2+2?")))) == ("What is 2+2?", "")


def test_system_then_earlier_turns_become_the_input():
    conversation = parse_messages(
        msgs(
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("developer", "Answer in English."),
            ("user", "Which animal guards the north gate?"),
        )
    )
    instruction, input = to_alpaca(conversation)
    assert instruction == "Which animal guards the north gate?"
    # System messages first (wherever they were), then the turns, one paragraph each.
    assert input == "Be brief.\n\nAnswer in English.\n\nUser: Hi\n\nAssistant: Hello."
    assert ALPACA.prompt(instruction, input) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nWhich animal guards the north gate?\n\n"
        "### Input:\nBe brief.\n\nAnswer in English.\n\nUser: Hi\n\nAssistant: Hello.\n\n### Response:\n"
    )


def test_text_parts_are_joined():
    parts = [{"type": "text", "text": "Add the "}, {"type": "text", "text": "two numbers."}]
    assert parse_messages(msgs(("user", parts))) == [ChatMessage("user", "Add the two numbers.")]


@pytest.mark.parametrize(
    "messages, mentions",
    [
        ([], "empty"),
        (msgs(("user", "Hi"), ("assistant", "Hello.")), "last message must be from the user"),
        (msgs(("system", "Be brief.")), "last message must be from the user"),
        (msgs(("tool", "42"), ("user", "Hi")), "tools are not supported"),
        (msgs(("robot", "beep")), "role 'robot'"),
        (msgs(("user", [{"type": "image_url", "image_url": {"url": "data:,"}}])), "only text parts"),
        (msgs(("user", None)), "string or a list"),
        (msgs(("user", 42)), "string or a list"),
        ([{"role": "user", "content": "Hi", "name": "alice"}], "name is not supported"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, {"role": "user", "content": "Hi"}],
            "tool_calls is not supported",
        ),
    ],
)
def test_unusable_conversations_are_refused(messages, mentions):
    with pytest.raises(Invalid) as caught:
        parse_messages(messages)
    assert mentions in caught.value.message
    assert caught.value.param == "messages"


def test_an_empty_last_user_message_is_refused():
    with pytest.raises(Invalid, match="empty"):
        to_alpaca(parse_messages(msgs(("system", "Be brief."), ("user", "  "))))


class FakeTokenizer:
    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template


def test_chat_template_is_used_for_a_chat_adapter_or_a_base_that_has_one():
    assert uses_chat_template("chat", FakeTokenizer(None), is_base=False)
    assert uses_chat_template("alpaca", FakeTokenizer("{{ x }}"), is_base=True)
    assert not uses_chat_template("alpaca", FakeTokenizer("{{ x }}"), is_base=False)  # an adapter's own template wins
    assert not uses_chat_template("alpaca", FakeTokenizer(None), is_base=True)


def test_render_chat_template_with_a_real_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    conversation = parse_messages(msgs(("developer", "Be brief."), ("user", "Hi")))
    assert render_chat_template(tokenizer, conversation) == "<s><system>Be brief.\n<user>Hi\n<assistant>"


def test_chat_template_missing_is_a_clear_error():
    with pytest.raises(Invalid, match="no chat template"):
        render_chat_template(FakeTokenizer(None), [ChatMessage("user", "Hi")])
