"""The OpenAI API's side of the server (inference/server.py): request bodies read and checked into
plain values, one-line errors in OpenAI's JSON shape, and the log-probability objects of both
endpoints. No HTTP and no engine here.

Fields the engine cannot honour (``echo``, ``suffix``, penalties, ``logit_bias``, tools, a JSON
response format) are refused with a 400 when set to anything but their neutral value; fields this
server does not know are ignored, as many clients send extra ones. ``top_k`` is an extension (vLLM's
too): 0 or -1 is off.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from inference.sampling import SamplingConfig

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
LOGPROB_FLOOR = -9999.0  # what OpenAI reports for an impossible token; JSON has no -Infinity
NEUTRAL = {"echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0, 0.0),
           "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []),
           "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none")}


class ApiError(Exception):
    """A request the server answers with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """What both endpoints ask of each choice. ``max_tokens`` None: up to the context window;
    ``length_name``: the field it came from (chat's ``max_completion_tokens`` or ``max_tokens``).
    ``logprobs`` None: none; k: each token's log-probability and its k most likely alternatives."""

    max_tokens: int | None
    sampling: SamplingConfig
    n: int
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None
    length_name: str = "max_tokens"


def _field(body: dict[str, Any], name: str, kind: str, default: Any = None) -> Any:
    """``body[name]`` checked to be of ``kind`` (int, number, bool, str, object); ``default`` when
    it is missing or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "object": isinstance(value, dict)}[kind]
    if not ok:
        article = "an" if kind in ("int", "object") else "a"
        raise ApiError(400, f"{name} must be {article} {kind}, got {type(value).__name__}", name)
    return value


def _at_least(name: str, value: int | None, low: int) -> int | None:
    if value is not None and value < low:
        raise ApiError(400, f"{name} must be >= {low}, got {value}", name)
    return value


def check_model(body: dict[str, Any], served: str) -> None:
    """404 unless ``model`` is the served model's name (or left out)."""
    model = _field(body, "model", "str", served)
    if model != served:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served!r}",
                       "model", "model_not_found")


def generation_params(body: dict[str, Any], *, chat: bool, max_logprobs: int) -> GenerationParams:
    """The sampling, length, choice, stop and streaming fields of a completions (``chat`` False) or
    chat completions body; ApiError(400) naming the first bad field."""
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in neutral:
            raise ApiError(400, f"{name} is not supported by this server", name)
    response_format = _field(body, "response_format", "object", {"type": "text"})
    if response_format.get("type") != "text":
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", "response_format")
    length_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _at_least(length_name, _field(body, length_name, "int", None if chat else 16), 1)
    temperature = _field(body, "temperature", "number", 1.0)
    top_p = _field(body, "top_p", "number", 1.0)
    top_k = _field(body, "top_k", "int", 0)
    top_k = 0 if top_k == -1 else top_k
    for problem in SamplingConfig(temperature, top_k, top_p).problems():
        name = problem.split()[0].removeprefix("--").replace("-", "_")
        raise ApiError(400, problem.removeprefix("--").replace("top-", "top_"), name)
    n = _at_least("n", _field(body, "n", "int", 1), 1)
    best_of = _field(body, "best_of", "int", n)
    if best_of != n:
        raise ApiError(400, "best_of is not supported by this server (only best_of = n)", "best_of")
    stream = _field(body, "stream", "bool", False)
    options = _field(body, "stream_options", "object", {})
    include_usage = options.get("include_usage") is True
    return GenerationParams(max_tokens, SamplingConfig(float(temperature), top_k, float(top_p)), n,
                            _at_least("seed", _field(body, "seed", "int"), 0), stop_strings(body),
                            stream, include_usage, _logprobs(body, chat, max_logprobs), length_name)


def stop_strings(body: dict[str, Any]) -> tuple[str, ...]:
    """``stop``: a string or a list of them (at most MAX_STOP_STRINGS, each non-empty and at most
    MAX_STOP_CHARS long)."""
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} strings of 1 to {MAX_STOP_CHARS} "
                       "characters", "stop")
    return tuple(stops)


def _logprobs(body: dict[str, Any], chat: bool, max_logprobs: int) -> int | None:
    """Completions: ``logprobs`` k (an int); chat: ``logprobs`` true and ``top_logprobs`` k."""
    if chat:
        wanted = _field(body, "logprobs", "bool", False)
        k = _field(body, "top_logprobs", "int")
        if k is not None and not wanted:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        name, k = "top_logprobs", (k or 0) if wanted else None
    else:
        name, k = "logprobs", _field(body, "logprobs", "int")
    if k is not None and not 0 <= k <= max_logprobs:
        raise ApiError(400, f"{name} must be in [0, {max_logprobs}], got {k}", name)
    return k


def prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """``prompt``: a string, a list of token ids, or a list of either (one completion each)."""
    prompt = body.get("prompt")

    def is_ids(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in value)

    if isinstance(prompt, str) or (is_ids(prompt) and prompt):
        out = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        out = list(prompt)
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list of "
                       "either", "prompt")
    if any(len(p) == 0 for p in out):
        raise ApiError(400, "prompt must not be empty", "prompt")
    return out


def messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages``: a non-empty list of {role, content}; content a string or a list of text parts
    (joined), or null."""
    found = body.get("messages")
    if not isinstance(found, list) or not found:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, message in enumerate(found):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           "messages")
        out.append({"role": message["role"], "content": content})
    return out


# ------------------------------------------------------------------------- log-probabilities

@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token for the logprobs objects: its text, bytes, log-probability, where its
    text starts in the completion, and its most likely alternatives as (text, bytes, logprob)."""

    text: str
    data: bytes
    logprob: float
    offset: int
    top: tuple[tuple[str, bytes, float], ...]


def finite(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR) if not math.isnan(logprob) else LOGPROB_FLOOR


def completion_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, list]:
    """The completions endpoint's ``logprobs``: parallel lists of tokens, their log-probabilities,
    {text: logprob} of the alternatives and text offsets."""
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text: lp for text, _, lp in e.top} for e in entries],
            "text_offset": [e.offset for e in entries]}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, list]:
    """The chat endpoint's ``logprobs``: {content: [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": list(e.data),
                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)}
                                          for t, b, lp in e.top]} for e in entries]}
