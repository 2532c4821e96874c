"""Chat messages → one prompt, for the OpenAI-compatible chat API.

Adapters are trained on Alpaca rows (instruction, input → response), so a conversation is folded
into those two fields and rendered with the adapter's own template, exactly as at training time:
instruction = the last user message; input = the system message(s), then the earlier turns as
"User: ..." / "Assistant: ..." paragraphs (empty for a single user message). A model whose template
is named "chat", or the base model when its tokenizer ships a chat template, is rendered with
`tokenizer.apply_chat_template` instead.

Pure: no FastAPI, no model. Errors are the server's `Invalid` (the api layer maps the status).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from server.errors import Invalid

CHAT_TEMPLATE_NAME = "chat"
SYSTEM_ROLES = ("system", "developer")  # "developer" is OpenAI's newer name for the system role
ROLES = (*SYSTEM_ROLES, "user", "assistant")
SPEAKERS = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str  # text parts already joined


def parse_messages(raw: list[dict[str, Any]]) -> list[ChatMessage]:
    """OpenAI message objects → ChatMessages; the last one must be the user's."""
    if not raw:
        raise Invalid("'messages' is empty: give at least one user message", param="messages")
    messages = [_parse_message(item, index) for index, item in enumerate(raw)]
    if messages[-1].role != "user":
        raise Invalid(f"the last message must be from the user, not {messages[-1].role!r}", param="messages")
    return messages


def _parse_message(item: dict[str, Any], index: int) -> ChatMessage:
    where = f"messages[{index}]"
    role = item.get("role")
    if role not in ROLES:
        hint = " (tools are not supported)" if role in ("tool", "function") else ""
        raise Invalid(f"{where}.role {role!r} is not supported{hint}; use one of {', '.join(ROLES)}", param="messages")
    # Fields that would change the answer but that we cannot honour are refused, never dropped.
    for name in ("name", "tool_calls", "function_call", "audio", "refusal"):
        if item.get(name) is not None:
            raise Invalid(f"{where}.{name} is not supported", param="messages")
    return ChatMessage(role=role, content=content_text(item.get("content"), where=where))


def content_text(content: Any, *, where: str) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise Invalid(f"{where}.content must be a string or a list of text parts", param="messages")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise Invalid(f"{where}.content: only text parts are supported, not {kind!r}", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def to_alpaca(messages: list[ChatMessage]) -> tuple[str, str]:
    """(instruction, input) for an Alpaca-style template (see the module docstring)."""
    *earlier, last = messages
    if not last.content.strip():
        raise Invalid("the last user message is empty", param="messages")
    systems = [m.content for m in earlier if m.role in SYSTEM_ROLES]
    turns = [f"{SPEAKERS[m.role]}: {m.content}" for m in earlier if m.role not in SYSTEM_ROLES]
    return last.content, "\n\n".join(systems + turns)


def uses_chat_template(template_name: str, tokenizer: Any, *, is_base: bool) -> bool:
    """Whether to render with the tokenizer's chat template rather than the Alpaca-style one."""
    return template_name == CHAT_TEMPLATE_NAME or (is_base and bool(getattr(tokenizer, "chat_template", None)))


def render_chat_template(tokenizer: Any, messages: list[ChatMessage]) -> str:
    """The conversation through the tokenizer's own chat template, ending where the assistant speaks."""
    if not getattr(tokenizer, "chat_template", None):
        raise Invalid(
            "this model's template is 'chat' but the base tokenizer has no chat template; "
            "use /v1/completions with a raw prompt",
            param="messages",
        )
    plain = [{"role": "system" if m.role in SYSTEM_ROLES else m.role, "content": m.content} for m in messages]
    try:
        return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the template refuses this conversation (raise_exception): the client's to fix
        raise Invalid(f"the model's chat template refuses these messages: {exc}", param="messages") from exc
