"""The server's Prometheus metrics (``GET /metrics``), in a registry of each app's own: the engine's
state read at each scrape (queue length, running sequences, KV blocks), tokens per second over the
last RATE_WINDOW seconds, time to first token, finished requests by reason, client disconnects and
responses by status code (``CountResponses``, an ASGI middleware).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.engine import Engine

RATE_WINDOW = 10.0  # seconds of generated tokens that tokens/s averages over
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class TokenRate:
    """Tokens per second over the last ``window`` seconds, from per-second counts (the window is
    shorter while the server is younger than it)."""

    def __init__(self, window: float = RATE_WINDOW):
        self.window, self.started = window, time.monotonic()
        self._counts: collections.deque[list[int]] = collections.deque()  # [second, tokens]

    def add(self, tokens: int = 1) -> None:
        second = math.floor(time.monotonic())
        if self._counts and self._counts[-1][0] == second:
            self._counts[-1][1] += tokens
        else:
            self._counts.append([second, tokens])
        self._drop_old(second)

    def per_second(self) -> float:
        now = time.monotonic()
        self._drop_old(math.floor(now))
        span = min(self.window, max(now - self.started, 1.0))
        return sum(count for _, count in self._counts) / span

    def _drop_old(self, second: int) -> None:
        while self._counts and self._counts[0][0] <= second - self.window:
            self._counts.popleft()


class _EngineCollector:
    """Reads ``Engine.stats()`` and the server's own gauges when Prometheus scrapes."""

    def __init__(self, engine: Engine, rate: TokenRate, in_flight: Callable[[], int]):
        self.engine, self.rate, self.in_flight = engine, rate, in_flight

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        gauges = [("queue_length", "requests waiting for a batch slot", stats.waiting),
                  ("running_sequences", "sequences admitted (prefilling or decoding)", stats.running),
                  ("prefilling_sequences", "admitted sequences still prefilling", stats.prefilling),
                  ("kv_blocks_in_use", "KV-cache blocks held by sequences", stats.kv_blocks_used),
                  ("kv_blocks_cached", "free KV-cache blocks kept as a reusable prefix",
                   stats.kv_blocks_cached),
                  ("kv_blocks_total", "usable KV-cache blocks", stats.kv_blocks_total),
                  ("requests_in_flight", "engine requests accepted and not yet finished (429 past "
                   "max_batch + max_queue)", self.in_flight()),
                  ("tokens_per_second", f"tokens generated per second over the last {RATE_WINDOW:g} s",
                   self.rate.per_second()),
                  ("compiled_programs", "programs the engine compiled", stats.compiles)]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"meshlm_{name}", doc, value=value)
        counters = [("generated_tokens", "tokens generated", stats.tokens_generated),
                    ("prefix_blocks_reused", "prompt blocks taken from the prefix cache",
                     stats.prefix_blocks_reused)]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"meshlm_{name}", doc, value=value)


class ServerMetrics:
    """The registry behind /metrics and the server's own instruments."""

    def __init__(self, engine: Engine, in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.rate = TokenRate()
        self.time_to_first_token = Histogram(
            "meshlm_time_to_first_token_seconds", "seconds from a request's arrival to its first token",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.finished = Counter("meshlm_requests_finished", "engine requests finished, by reason "
                                "(stop, length, cancelled, error)", ["reason"], registry=self.registry)
        self.disconnects = Counter("meshlm_client_disconnects",
                                   "requests whose client left before the end (their sequences freed)",
                                   registry=self.registry)
        self.responses = Counter("meshlm_http_responses", "HTTP responses, by status code", ["code"],
                                 registry=self.registry)
        self.registry.register(_EngineCollector(engine, self.rate, in_flight))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountResponses:
    """ASGI middleware: counts the app's responses by status code."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting if scope["type"] == "http" else send)
