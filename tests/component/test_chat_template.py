"""The llama engine's chat template renders prompts exactly as llama-cpp-python's ``Jinja2ChatFormatter`` does.

The engine renders ``tokenizer.chat_template`` itself (``agent/inference/llama.py``: ``_ChatTemplate``) so that it
does not import llama-cpp-python's high-level package and numpy; these tests hold it to upstream's formatter, with
the real SmolLM2 GGUF's template and with small templates that exercise each part of the environment upstream sets
up (sandbox, trim/lstrip blocks, loop controls, ``{% generation %}``, ``tojson``, ``raise_exception``,
``strftime_now``, the tool variables).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from agent.inference import ModelSpec, load_model
from agent.inference.llama import LlamaModel, _ChatTemplate

pytestmark = pytest.mark.component

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "And of Spain? {{ not a tag }} {% neither %} <|im_end|> é 日本 🙂"},
    ],
    [{"role": "user", "content": "  leading and trailing  \n\n"}, {"role": "assistant", "content": ""}],
    [{"role": "tool", "content": '{"temperature": 21}'}, {"role": "user", "content": "Summarise."}],
]


def _upstream(template: str, bos: str, eos: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, stop_token_ids=[2])


@pytest.fixture(scope="module")
def smollm2_model(smollm2_path: Path) -> Iterator[LlamaModel]:
    sha256 = hashlib.sha256(smollm2_path.read_bytes()).hexdigest()
    spec = ModelSpec("smollm2", "q4_1", smollm2_path, "gguf", sha256, smollm2_path.stat().st_size, 2048, 2, 1)
    model = load_model(spec)
    assert isinstance(model, LlamaModel)
    yield model
    asyncio.run(model.aclose())


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "system", "multi-turn", "whitespace", "tool"])
def test_the_gguf_template_renders_as_upstream(smollm2_model: LlamaModel, messages: list[dict[str, str]]) -> None:
    """SmolLM2's own template gives upstream's prompt and stop strings, and the prompt's tokens are the same."""
    native = smollm2_model._native
    template = bytes(_llama_cpp().llama_model_chat_template(native.model, None)).decode()
    bos, eos = native.token_text(native.bos), native.token_text(native.eos)
    ours = smollm2_model._formatter
    assert ours is not None
    theirs = _upstream(template, bos, eos)(messages=messages)  # type: ignore[arg-type]
    assert ours.render(messages) == theirs.prompt
    assert list(ours.stop) == theirs.stop
    tokens, stops = smollm2_model._prepare_chat(messages)
    assert tokens == native.tokenize(theirs.prompt, not theirs.added_special, True)
    assert stops == theirs.stop


def _llama_cpp() -> Any:
    from agent.inference import llama

    return llama.llama_cpp


TEMPLATES = {
    "trim-lstrip-loopcontrols": (
        "{{ bos_token }}\n  {% for m in messages %}\n    {% if loop.index > 2 %}{% break %}{% endif %}\n"
        "    {% if m.role == 'system' %}{% continue %}{% endif %}\n"
        "<{{ m.role }}>{{ m.content | trim }}{{ eos_token }}\n  {% endfor %}\n"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    ),
    "generation-tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
        "{% else %}{{ m.content }}{% endif %}|{% endfor %}"
    ),
    "tojson": "{{ messages | tojson }}{{ messages[0] | tojson(indent=2) }}{{ {'b': 1, 'a': 'é<'} | tojson }}",
    "tool-variables": (
        "{{ tools is defined }} {{ tools is none }} {{ tool_choice is none }} {{ functions is none }} "
        "{{ function_call is none }} {{ add_generation_prompt }} {{ strftime_now('%Y') }}"
    ),
    "namespace-and-filters": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
        "{{ ns.n }} {{ messages[-1].content | upper | replace('A', 'a') }} {{ (messages | length) > 1 }}"
    ),
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", CONVERSATIONS[1:3], ids=["system", "multi-turn"])
def test_the_environment_is_upstreams(name: str, messages: list[dict[str, str]]) -> None:
    """Each feature of upstream's jinja2 environment renders the same (whitespace control, tags, filters, globals)."""
    template = TEMPLATES[name]
    ours = _ChatTemplate(template, bos_token="<s>", eos_token="</s>")
    assert ours.render(messages) == _upstream(template, "<s>", "</s>")(messages=messages).prompt  # type: ignore[arg-type]


def test_raise_exception_raises_the_same_error() -> None:
    """A template's ``raise_exception`` raises ValueError with its message, as upstream's does."""
    template = (
        "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}"
    )
    messages = CONVERSATIONS[1]
    with pytest.raises(ValueError, match=r"^first message must be from the user$"):
        _upstream(template, "", "")(messages=messages)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^first message must be from the user$"):
        _ChatTemplate(template, bos_token="", eos_token="").render(messages)


def test_the_sandbox_refuses_what_upstreams_refuses() -> None:
    """The immutable sandbox refuses attribute tricks and mutating the messages, as upstream's does."""
    import jinja2.exceptions

    for template in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            _upstream(template, "", "")(messages=[])
        with pytest.raises(jinja2.exceptions.SecurityError):
            _ChatTemplate(template, bos_token="", eos_token="").render([])
