"""Chat templates: a model's Jinja template (from tokenizer_config.json or GGUF metadata) rendered in
a sandbox, with the context Hugging Face gives it (messages, add_generation_prompt, the special token
strings, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks in some
    templates): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in an immutable sandbox; ValueError for a syntax error."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` as a list of dicts, each with a string ``role``; ValueError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"message {i} is not a dict with a string 'role'")
        out.append(dict(message))
    return out


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool = True, special_tokens: Mapping[str, str | None] | None = None,
                **extra: Any) -> str:
    """The text of ``messages`` in ``template``; ``special_tokens`` (``bos_token``, ``eos_token``, ...)
    and ``extra`` (e.g. ``tools``) join the context. ValueError when the template rejects the
    conversation (its ``raise_exception``) or fails to render."""
    context: dict[str, Any] = {"tools": None, "documents": None}  # as Hugging Face passes them
    context.update({name: value for name, value in (special_tokens or {}).items() if value is not None})
    context.update(extra)
    try:
        return compile_chat_template(template).render(
            messages=check_messages(messages), add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e.message or type(e).__name__}") from None
