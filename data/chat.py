"""Chat templates: a model's Jinja template (from tokenizer_config.json or GGUF metadata) rendered in
a sandbox, with the context Hugging Face gives it (messages, add_generation_prompt, the special token
strings, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text).

A template comes from a file of unknown origin, so a rendering is bounded: it may take
RENDER_SECONDS and create RENDER_CHARS characters (output and intermediate values together); past
either it ends with a ValueError. Every loop iteration, call, filter, intercepted operator and piece
of output counts; operations that could make a value far larger than their inputs (``*``, ``**``,
format widths, padding, ``replace``, ``join``) are refused before they run when they would exceed
the allowance. Real templates take milliseconds and a few times the conversation's size.
"""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from core.errors import first_line

RENDER_SECONDS = 2.0  # wall-clock time one rendering may take
RENDER_CHARS = 1 << 24  # characters (list items) one rendering may create
MAX_TEMPLATE_CHARS = 1 << 20  # a chat template's own length (real ones: a few KB)
MAX_INT_DIGITS = 4300  # Python's own limit for printing an integer
WIDE_FORMAT = re.compile(r"\d{7,}")  # a field width or precision of a million or more
GUARD, COUNT = "meshlm_guard", "meshlm_count"  # the filters the loops and outputs go through


class TemplateLimitError(jinja2.exceptions.TemplateError):
    """A rendering that went past its time or size allowance."""


class _Budget:
    """One rendering's allowance: a deadline and the characters it may still create."""

    def __init__(self) -> None:
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.chars = RENDER_CHARS

    def check(self, size: int) -> None:
        if size > self.chars:
            raise TemplateLimitError(f"the template would create {size} more characters, past the "
                                     f"{RENDER_CHARS} a rendering may create")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"the template ran longer than {RENDER_SECONDS:g} s")

    def spend(self, size: int) -> None:
        self.check(size)
        self.chars -= size


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_budget", default=None)


def _budget() -> _Budget:
    """The current rendering's allowance (a fresh one outside a rendering: compile-time folding)."""
    return _BUDGET.get() or _Budget()


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and WIDE_FORMAT.search(fmt):
        raise TemplateLimitError("a format width or precision of a million or more")


def _check_ints(values: Any, budget: _Budget) -> None:
    for value in values:
        if isinstance(value, int) and abs(value) > budget.chars:
            raise TemplateLimitError(f"an argument of {value} exceeds what a rendering may create")


def _projected_size(name: str, value: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    """An upper bound on the size of ``name(value, *args)`` for the str methods and filters whose
    result can dwarf their inputs; 0 for the rest (their result is counted once made)."""
    arg = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(arg, int):
        return max(_size(value), arg)
    if name == "expandtabs" and isinstance(value, str):
        return len(value) * max(arg if isinstance(arg, int) else 8, 1)
    if name == "indent" and isinstance(value, str):
        width = kwargs.get("width", arg if arg is not None else 4)
        return len(value) + (value.count("\n") + 1) * (width if isinstance(width, int) else _size(width))
    if name == "replace" and isinstance(value, str) and len(args) >= 2 and isinstance(arg, str):
        found = value.count(arg) if arg else len(value) + 1
        return len(value) + found * _size(args[1])
    if name == "join" and isinstance(value, Sized):  # value: the items; arg: the separator
        return len(value) * (1 + _size(arg if arg is not None else kwargs.get("d", "")))
    return 0


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a filter) with its arguments checked and its result counted."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context/environment

    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        value, rest = args[skip], args[skip + 1:]
        if name == "join" and not isinstance(value, Sized):
            value = list(value)
            args = (*args[:skip], value, *rest)
        if name == "format":
            _check_format(value)
        _check_ints((*rest, *kwargs.values()), budget)
        budget.check(_projected_size(name, value, rest, kwargs))
        result = func(*args, **kwargs)
        budget.spend(_size(result))
        return result

    return bounded


@jinja2.pass_context
def _guard(context: Any, iterable: Any) -> Any:
    """Every loop's iterable: each iteration checks the deadline."""
    budget = _budget()
    for item in iterable:
        budget.check(0)
        yield item


@jinja2.pass_context
def _count(context: Any, value: Any) -> Any:
    """Every piece of output and every ``~`` concatenation: counted against the allowance."""
    _budget().spend(len(value) if isinstance(value, str) else len(str(value)))
    return value


class _Bounder(NodeTransformer):
    """Routes every loop's iterable through GUARD and every output piece (template text included)
    and ``~`` concatenation through COUNT."""

    def _counted(self, node: nodes.Expr) -> nodes.Expr:
        return nodes.Filter(node, COUNT, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:  # noqa: N802 (jinja's visitor names)
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, GUARD, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:  # noqa: N802 (jinja's visitor names)
        self.generic_visit(node)
        return self._counted(node)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:  # noqa: N802 (jinja's visitor names)
        self.generic_visit(node)
        node.nodes = [self._counted(nodes.Const(child.data, lineno=child.lineno)
                                    if isinstance(child, nodes.TemplateData) else child)
                      for child in node.nodes]
        return node


class _BoundingCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Any = None) -> None:  # noqa: N802 (jinja's visitor names)
        super().visit_Template(_Bounder().visit(node), frame)


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with time and size bounds (see the module docstring)."""

    code_generator_class = _BoundingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        del self.globals["lipsum"]  # writes as many paragraphs as asked, in one call
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.filters[GUARD], self.filters[COUNT] = _guard, _count

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if _size(seq) and isinstance(times, int):
                    budget.check(_size(seq) * times)
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                and right > 0 and right * math.log10(abs(left)) > MAX_INT_DIGITS:
            raise TemplateLimitError(f"an integer of more than {MAX_INT_DIGITS} digits")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_ints(right if isinstance(right, tuple) else (right,), budget)
        result = super().call_binop(context, operator, left, right)
        budget.spend(_size(result))
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        name, receiver = getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None)
        if isinstance(receiver, str) and name == "join" and args:
            args = (list(args[0]), *args[1:])
            budget.check(_projected_size("join", args[0], (receiver,), {}))
        elif isinstance(receiver, str):
            budget.check(_projected_size(name, receiver, args, kwargs))
        _check_ints((*args, *kwargs.values()), budget)
        result = super().call(__context, __obj, *args, **kwargs)
        budget.spend(_size(result))
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


# The markers ``{% generation %}`` blocks write around their output while `render_chat_spans` runs
# (a fresh random pair per rendering, so a conversation's text cannot forge them); "" otherwise.
_MARKERS: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("chat_markers",
                                                                                  default=None)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks in some
    templates): rendered as its body, between two markers while `render_chat_spans` records spans."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        mark = [nodes.Output([self.call_method("_marker", [nodes.Const(side)])]) for side in (0, 1)]
        return jinja2.nodes.Scope([mark[0], *body, mark[1]]).set_lineno(lineno)

    def _marker(self, side: int) -> str:
        markers = _MARKERS.get()
        return markers[side] if markers else ""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    if _size(indent) > 16 or (isinstance(indent, int) and indent > 16):
        raise TemplateLimitError(f"tojson indent {indent!r} (at most 16)")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in a bounded immutable sandbox; ValueError for a syntax error."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"the chat template has {len(template)} characters (at most "
                         f"{MAX_TEMPLATE_CHARS})")
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[loopcontrols, _GenerationTag])
    env.filters["tojson"] = _bounded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None
    except RecursionError:
        raise ValueError("the chat template does not compile: nested too deeply") from None


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
                continue_final_message: bool = False, **extra: Any) -> str:
    """The text of ``messages`` in ``template``; ``special_tokens`` (``bos_token``, ``eos_token``, ...)
    and ``extra`` (e.g. ``tools``) join the context. With ``continue_final_message`` the text ends
    right after the last message's content, left open for the model to continue (``transformers``'
    option of that name). ValueError when the template rejects the conversation (its
    ``raise_exception``), fails, or goes past its time or size allowance."""
    context: dict[str, Any] = {"tools": None, "documents": None}  # as Hugging Face passes them
    context.update({name: value for name, value in (special_tokens or {}).items() if value is not None})
    context.update(extra)
    compiled = compile_chat_template(template)
    token = _BUDGET.set(_Budget())
    try:
        messages = check_messages(messages)
        if continue_final_message:
            messages = _tag_final_message(messages)
        text = compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e.message or type(e).__name__}") from None
    except Exception as e:  # the template is code from a file: whatever it raises is its failure
        raise ValueError(f"chat template: {type(e).__name__}: {first_line(e)}") from None
    finally:
        _BUDGET.reset(token)
    return _cut_at_tag(text) if continue_final_message else text


# transformers' way to find where the final message's content ends in a rendering: a marker appended
# to it, then everything from the marker on cut off (its trailing space tells whether the template
# strips the content; if it does, so is the cut text)
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not messages or not isinstance(messages[-1].get("content"), str):
        raise ValueError("continue_final_message needs a final message with text content")
    return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + CONTINUE_TAG}]


def _cut_at_tag(text: str) -> str:
    if CONTINUE_TAG.strip() not in text:
        raise ValueError("chat template: the final message does not appear in the rendering, so it "
                         "cannot be continued")
    at = text.rindex(CONTINUE_TAG.strip())
    return text[:at] if text[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG else text[:at].rstrip()


def render_chat_spans(template: str, messages: Sequence[Mapping[str, Any]], *,
                      special_tokens: Mapping[str, str | None] | None = None,
                      **extra: Any) -> tuple[str, list[tuple[int, int]]]:
    """(the text of ``messages`` without a generation prompt, the character spans [start, end) the
    template's ``{% generation %}`` blocks wrote; [] when it has none). The text equals
    `render_chat`'s. ValueError as `render_chat`, or for blocks that nest or do not close."""
    nonce = secrets.token_hex(8)
    markers = (f"\ue000{nonce}<", f"\ue000{nonce}>")  # private-use character + a random nonce
    token = _MARKERS.set(markers)
    try:
        marked = render_chat(template, messages, add_generation_prompt=False,
                             special_tokens=special_tokens, **extra)
    finally:
        _MARKERS.reset(token)
    pieces = re.split(f"({re.escape(markers[0])}|{re.escape(markers[1])})", marked)
    text, spans, start = [], [], None
    length = 0
    for piece in pieces:
        if piece in markers:
            if (piece == markers[0]) != (start is None):
                raise ValueError("chat template: {% generation %} blocks nest or do not close")
            if piece == markers[0]:
                start = length
            else:
                spans.append((start, length))
                start = None
        else:
            text.append(piece)
            length += len(piece)
    if start is not None:
        raise ValueError("chat template: {% generation %} blocks nest or do not close")
    return "".join(text), [s for s in spans if s[1] > s[0]]
