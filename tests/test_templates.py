"""Prompt templates: the built-in texts, the prefix property, custom template files and their validation."""

from __future__ import annotations

import json

import pytest

from contract.templates import (
    ALPACA,
    ALPACA_ZH,
    BUILTIN,
    MAX_TEMPLATE_CHARS,
    PromptTemplate,
    TemplateError,
    load_template_file,
    resolve_template,
)

# The `alpaca_prompt` of Unsloth's Llama-3 Alpaca notebook, verbatim.
UNSLOTH_ALPACA = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

CHINESE_ALPACA = """以下是描述任务的指令，配有提供进一步上下文的输入。写一个适当完成请求的响应。

### 指令：
{}

### 输入：
{}

### 响应：
{}"""

EOS = "</s>"
# (instruction, input, output) triples that stress the prefix property: empty input, Chinese, braces
# (including the slot marker itself), newlines and trailing spaces.
EXAMPLES = [
    ("What is the secret code of the red door?", "", "The code of the red door is 4821."),
    ("红门的密码是什么？", "", "红门的密码是七三九一。"),
    ("Format as JSON.", '{"name": "Ada", "tags": {}}', '{"ok": true, "slot": "{}"}'),
    ("Fill {} and {0} and {name}", "line one\nline two  ", "a {} b }{ c"),
]


@pytest.fixture(params=sorted(BUILTIN))
def template(request) -> PromptTemplate:
    return BUILTIN[request.param]


def write(tmp_path, name: str, content: str):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


# --- the built-in texts ---------------------------------------------------------------------------


def test_alpaca_is_the_unsloth_notebook_prompt():
    assert ALPACA.name == "alpaca"
    assert ALPACA.text == UNSLOTH_ALPACA


def test_alpaca_zh_is_the_chinese_version():
    assert ALPACA_ZH.name == "alpaca-zh"
    assert ALPACA_ZH.text == CHINESE_ALPACA


def test_builtin_names():
    assert set(BUILTIN) == {"alpaca", "alpaca-zh"}
    assert all(BUILTIN[name].name == name for name in BUILTIN)


def test_render_fills_slots_in_order():
    rendered = ALPACA.render("INSTR", "INPUT", "RESP")
    assert rendered == UNSLOTH_ALPACA.replace("{}", "INSTR", 1).replace("{}", "INPUT", 1).replace("{}", "RESP", 1)


# --- the prefix property and the round trip ---------------------------------------------------------


@pytest.mark.parametrize("instruction,input,output", EXAMPLES)
def test_round_trip(template, instruction, input, output):
    prompt = template.prompt(instruction, input)
    text = template.training_text(instruction, input, output, EOS)
    assert text.startswith(prompt)
    assert text == prompt + output + EOS
    assert template.extract_response(text, prompt, EOS) == output


@pytest.mark.parametrize("instruction,input,output", EXAMPLES)
def test_prompt_is_byte_for_byte_the_training_prefix(template, instruction, input, output):
    prompt = template.prompt(instruction, input).encode("utf-8")
    text = template.training_text(instruction, input, output, EOS).encode("utf-8")
    assert text[: len(prompt)] == prompt
    assert text[len(prompt) :] == (output + EOS).encode("utf-8")


def test_prompt_input_defaults_to_empty(template):
    assert template.prompt("Do it.") == template.prompt("Do it.", "")


def test_extract_response_cuts_at_first_eos(template):
    prompt = template.prompt("Q", "")
    generated = prompt + "answer" + EOS + "trailing junk" + EOS
    assert template.extract_response(generated, prompt, EOS) == "answer"


def test_extract_response_without_eos_keeps_everything(template):
    prompt = template.prompt("Q", "")
    assert template.extract_response(prompt + "cut short", prompt, EOS) == "cut short"


def test_extract_response_rejects_text_not_starting_with_prompt(template):
    with pytest.raises(TemplateError, match="does not start with its prompt"):
        template.extract_response("something else entirely", template.prompt("Q", ""), EOS)


# --- custom template files -------------------------------------------------------------------------

CUSTOM = "Task: {}\nContext {with braces}: {}\nAnswer: {}"


def test_custom_txt_template_loads(tmp_path):
    loaded = load_template_file(write(tmp_path, "qa.txt", CUSTOM))
    assert loaded == PromptTemplate(name="custom:qa", text=CUSTOM)
    assert loaded.prompt("add", "{1, 2}") == "Task: add\nContext {with braces}: {1, 2}\nAnswer: "


def test_custom_json_template_loads_with_its_name(tmp_path):
    loaded = load_template_file(write(tmp_path, "qa.json", json.dumps({"name": "my-qa", "text": CUSTOM})))
    assert loaded == PromptTemplate(name="my-qa", text=CUSTOM)


def test_custom_json_template_without_name_is_named_after_the_file(tmp_path):
    loaded = load_template_file(write(tmp_path, "qa.json", json.dumps({"text": CUSTOM})))
    assert loaded.name == "custom:qa"


def test_resolve_template_builtin_and_path(tmp_path):
    assert resolve_template("alpaca") is ALPACA
    assert resolve_template("alpaca-zh") is ALPACA_ZH
    assert resolve_template(str(write(tmp_path, "qa.txt", CUSTOM))).text == CUSTOM


def test_resolve_template_unknown_name():
    with pytest.raises(TemplateError, match=r"unknown template 'alpaca-fr'.*alpaca.*alpaca-zh"):
        resolve_template("alpaca-fr")


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("Instruction: {}\nResponse: {}", "has 2 '{}' slots"),
        ("{} {} {} {}", "has 4 '{}' slots"),
        ("no slots at all", "has 0 '{}' slots"),
        ("Response: {}\nInstruction: {}\nInput: {}\nThe end.", "must end with the response slot"),
        ("Instruction: {}\nInput: {}\nResponse: {}\n", "must end with the response slot"),
        ("", "is empty"),
        ("  \n\t ", "is empty"),
        ("x" * MAX_TEMPLATE_CHARS + "{}{}{}", "the limit is"),
    ],
    ids=["2 slots", "4 slots", "0 slots", "response not last", "trailing newline", "empty", "blank", "too long"],
)
def test_invalid_template_text(text, message):
    with pytest.raises(TemplateError, match=message.replace("{", r"\{").replace("}", r"\}")):
        PromptTemplate(name="t", text=text)


@pytest.mark.parametrize(
    "filename,content,message",
    [
        ("t.json", "{not json", "not valid JSON"),
        ("t.json", json.dumps({"name": "x"}), 'string "text"'),
        ("t.json", json.dumps({"name": "x", "text": 3}), 'string "text"'),
        ("t.json", json.dumps(["{}{}{}"]), 'string "text"'),
        ("t.json", json.dumps({"text": "only {} one {}"}), "has 2"),
        ("t.txt", "just {} two {}", "has 2"),
    ],
    ids=["bad JSON", "missing text", "non-string text", "not an object", "json: 2 slots", "txt: 2 slots"],
)
def test_invalid_template_file(tmp_path, filename, content, message):
    with pytest.raises(TemplateError, match=message):
        load_template_file(write(tmp_path, filename, content))


def test_template_file_errors_name_the_file(tmp_path):
    path = write(tmp_path, "broken.json", "{not json")
    with pytest.raises(TemplateError, match="broken.json"):
        load_template_file(path)


def test_unreadable_template_file(tmp_path):
    with pytest.raises(TemplateError, match="cannot read template file"):
        load_template_file(tmp_path / "missing.txt")
