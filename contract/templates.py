"""Prompt templates as data.

A template is text with exactly three `{}` slots: instruction, input, response — in that order, the
response slot last. Training text is `render(instruction, input, output) + eos`; the serving prompt is
`prompt(instruction, input)`, which is byte-for-byte the training text up to the response. Keeping the
response slot at the very end is what makes that prefix property hold, so custom templates must too.

Slots are split on the literal `{}`, never passed through `str.format`, so a template may contain
other braces (JSON examples, code) without escaping.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SLOT = "{}"
MAX_TEMPLATE_CHARS = 8192


class TemplateError(ValueError):
    """A template that cannot be used; the message says why."""


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str

    def __post_init__(self) -> None:
        _validate_text(self.text, where=self.name)

    def render(self, instruction: str, input: str, response: str) -> str:
        head, between, tail, _ = self.text.split(SLOT)
        return f"{head}{instruction}{between}{input}{tail}{response}"

    def prompt(self, instruction: str, input: str = "") -> str:
        """The serving prompt: the training text up to where the response begins."""
        return self.render(instruction, input, "")

    def training_text(self, instruction: str, input: str, output: str, eos: str) -> str:
        return self.render(instruction, input, output) + eos

    def extract_response(self, full_text: str, prompt: str, eos: str) -> str:
        """The response part of a decoded `prompt + generation`: prompt stripped, cut at the first EOS."""
        if not full_text.startswith(prompt):
            raise TemplateError("generated text does not start with its prompt")
        return full_text[len(prompt) :].split(eos, 1)[0]


def _validate_text(text: str, *, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise TemplateError(f"template {where!r} is empty")
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"template {where!r} is {len(text)} characters; the limit is {MAX_TEMPLATE_CHARS}")
    slots = text.count(SLOT)
    if slots != 3:
        raise TemplateError(
            f"template {where!r} has {slots} '{{}}' slots; it needs exactly 3 (instruction, input, response)"
        )
    if not text.endswith(SLOT):
        raise TemplateError(
            f"template {where!r} must end with the response slot '{{}}' so the serving prompt is a prefix "
            "of the training text"
        )


ALPACA = PromptTemplate(
    name="alpaca",
    text=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
    ),
)

ALPACA_ZH = PromptTemplate(
    name="alpaca-zh",
    text=(
        "以下是描述任务的指令，配有提供进一步上下文的输入。写一个适当完成请求的响应。\n\n"
        "### 指令：\n{}\n\n### 输入：\n{}\n\n### 响应：\n{}"
    ),
)

BUILTIN = {t.name: t for t in (ALPACA, ALPACA_ZH)}


def load_template_file(path: str | Path) -> PromptTemplate:
    """A custom template: a `.json` file `{"name", "text"}` or any other file holding the text itself."""
    path = Path(path)
    try:
        # utf-8-sig: a BOM (Windows editors write one) would otherwise begin every prompt, in training and serving.
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read template file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":  # as data files are matched: `QA.JSON` is JSON too
        return _template_from_json(raw, path)
    return PromptTemplate(name=f"custom:{path.stem}", text=_without_final_newline(raw))


def _without_final_newline(raw: str) -> str:
    # Editors end a text file with a newline that is not part of the template; drop that one only (read_text
    # has already turned a Windows "\r\n" into "\n"). More text after the response slot is still refused,
    # by PromptTemplate itself, which stays strict.
    return raw.removesuffix("\n")


def _template_from_json(raw: str, path: Path) -> PromptTemplate:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise TemplateError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise TemplateError(f'{path}: expected an object {{"name": ..., "text": ...}} with a string "text"')
    return PromptTemplate(name=str(data.get("name") or f"custom:{path.stem}"), text=data["text"])


def resolve_template(spec: str) -> PromptTemplate:
    """A built-in name (`alpaca`, `alpaca-zh`) or a path to a template file."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if Path(spec).is_file():
        return load_template_file(spec)
    raise TemplateError(f"unknown template {spec!r}: use one of {sorted(BUILTIN)} or a path to a template file")
