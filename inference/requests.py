"""What a caller of the serving engine (inference/engine.py) hands in and gets back: a ``Request``,
the ``Handle`` that streams its ``Event``s and ends in a ``Completion``. Plain Python: the engine
thread fills a handle, any other thread reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence

from inference.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


@dataclasses.dataclass(frozen=True)
class Request:
    """One sequence to continue: up to ``max_tokens`` new ids after ``prompt``, ending early at any
    of ``stop_ids`` (left out of the output). ``sampling``: temperature (0 = greedy), top-k, top-p;
    ``seed``: the draws' seed (default: the request's id). ``logprobs``: None for none, else each
    token's log-probability and its ``logprobs`` most likely alternatives (0 = only the token's).
    ``on_event``: called in the engine's thread with each event (keep it short: hand the event to
    your own loop, e.g. ``loop.call_soon_threadsafe``). Several choices (OpenAI's ``n``) are
    several requests."""

    prompt: Sequence[int]
    max_tokens: int = 16
    stop_ids: Collection[int] = ()
    sampling: SamplingConfig = GREEDY
    seed: int | None = None
    logprobs: int | None = None
    on_event: Callable[[Event], None] | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    """One streamed step of a request: a new token (``token``, None on a last event that brings no
    token: a stop id, a cancel) with its log-probabilities when asked, and on the request's last
    event its ``finish_reason``: ``stop`` (a stop id), ``length`` (max_tokens or the context
    window), ``cancelled`` or ``error`` (the engine failed)."""

    token: int | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None


@dataclasses.dataclass
class Completion:
    """A finished request: its new tokens (stop id excluded), their log-probabilities and top
    alternatives (empty lists unless asked), why it ended, how many prompt tokens it had and how
    many of those came from the prefix cache, and its time to first token in seconds."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...]]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    time_to_first_token: float | None


class Handle:
    """A submitted request: iterate it for its events as they come (blocking), or wait for its
    ``result()``; ``cancel()`` ends it (a running one at the engine's next step)."""

    def __init__(self, request_id: int, request: Request, cancel: Callable[[Handle], None]):
        self.id, self.request = request_id, request
        self._cancel = cancel
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._done = threading.Event()
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.cached_tokens = 0
        self.cancel_requested = False
        self._completion = Completion([], [], [], "", len(request.prompt), 0, None)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ends the request: a waiting one at once, a running one at the next step (its blocks are
        freed then); the last event's finish reason is ``cancelled``. No-op once done."""
        self._cancel(self)

    def __iter__(self) -> Iterator[Event]:
        """The events, blocking for each, until the last one (which is yielded too)."""
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once the request has finished; TimeoutError after ``timeout`` s."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        return self._completion

    # ------------------------------------------------------------------ called by the engine

    def emit(self, event: Event) -> None:
        """Records ``event`` and passes it on (queue and callback); the last one completes it."""
        out = self._completion
        if event.token is not None:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
                out.time_to_first_token = self.first_token_at - self.submitted_at
            out.tokens.append(event.token)
            if event.logprob is not None:
                out.logprobs.append(event.logprob)
                out.top_logprobs.append(event.top_logprobs)
        if event.finish_reason is not None:
            out.finish_reason, out.cached_tokens = event.finish_reason, self.cached_tokens
        self._events.put(event)
        if self.request.on_event is not None:
            try:
                self.request.on_event(event)
            except Exception:  # a caller's bug must not stop the engine: end this request only
                logging.getLogger(__name__).exception("on_event of request %d failed", self.id)
                self.cancel_requested = True
        if event.finish_reason is not None:
            self._done.set()
