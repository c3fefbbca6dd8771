"""The serving engine: continuous batching over a paged KV cache. Requests join and leave the
running batch at token granularity; a long prompt is prefilled in fixed chunks between decode steps.

Each ``step()`` (called in a loop by ``start()``'s thread, or by hand) is one scheduler iteration:
1. end cancelled requests, then admit waiting ones in order while batch slots and KV blocks allow
   (a request takes the blocks for its whole context, prompt + max_tokens, when admitted: it never
   waits for blocks mid-generation, so nothing is ever preempted);
2. one decode step, [Bk, 1], for every sequence past its prompt (Bk: the smallest power of two,
   up to ``max_batch``, that holds them; rows past them are padding);
3. one prefill chunk, [1, C], of the oldest admitted prompt (C = ``prefill_chunk`` tokens; the
   last chunk at the shortest of ``chunk_lengths`` that holds it, padded); the last chunk samples
   the first new token. Full prompt blocks are registered for prefix reuse (inference/paged.py)
   as soon as they are written.
So the programs are one per chunk length and one decode per bucket (a chunk length of 1 is the
1-row decode's program), every block table ``max_seq_len / BS`` wide: ``warm_up()`` compiles
them all and ``compiles`` counts traces, so nothing compiles later.
Shardings are explicit as in inference/generate.py (parameters as given, rows over the batch axes,
the cache's kv heads over ``tensor``, its blocks whole on every device) and the cache is donated.
An MoE model runs with ``inference_config``'s capacity, so no token is dropped.

Block size (default 16; reasoned, not benchmarked): a sequence leaves at most BS - 1 slots of its
last block empty; prefix reuse shares whole blocks, so smaller blocks share more of a common prefix;
tables are max_seq_len / BS wide (built on the host per row and step, gathered by the einsum path).
16 is vLLM's GPU default: little waste, short tables at a few thousand tokens. A TPU kernel moves a
block per DMA and prefers 32-128 tokens: measure with it (``model/attention.py: paged_attention``).

Not here: preemption and swapping, speculative decoding, a TPU paged-attention kernel, MLA models
(their latent cache), overlapping the host's scheduling with the device's step. On a data-parallel
mesh the decode rows are split over the replicas but every device holds the whole cache (blocks are
not split): one engine per replica's sub-mesh is how KV memory would grow with replicas.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from core.errors import first_line
from inference.generate import inference_graphdef
from inference.paged import BlockManager
from inference.requests import Event, Handle, Request
from inference.sampling import sample_rows, token_logprobs
from model.config import ModelConfig
from model.paged_attention import PAGED_CACHE_AXES
from model.transformer import PAGED_MLA_ERROR, Cache, paged_cache_shapes
from sharding.constrain import under_activation_sharding
from sharding.rules import Rules, logical_sharding

DEFAULT_BLOCK_SIZE = 16
ROW_FIELDS = {"tokens": ("batch", "length"), "positions": ("batch", "length"), "lengths": ("batch",),
              "table": ("batch", None), "seeds": ("batch",), "counters": ("batch",),
              "temperature": ("batch",), "top_k": ("batch",), "top_p": ("batch",)}


def chunk_lengths(prefill_chunk: int) -> list[int]:
    """Prefill chunk lengths: a quarter, a half and all of ``prefill_chunk`` (those >= 1). A
    prompt's last chunk runs at the shortest that holds it: by default a 20-token prompt computes
    32 positions, not 128, and a 150-token one 128 + 32, not 256."""
    return sorted({c for c in (prefill_chunk // 4, prefill_chunk // 2, prefill_chunk) if c >= 1})


def decode_buckets(max_batch: int) -> list[int]:
    """Decode batch sizes: the powers of two below ``max_batch``, and ``max_batch``."""
    return [b for b in (1 << i for i in range(max_batch.bit_length())) if b < max_batch] + [max_batch]


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """For a server's /metrics: requests waiting and admitted (``running``, of which
    ``prefilling``), KV blocks held by sequences / cached for prefix reuse / usable in all, totals
    since start, and the compile count (constant after ``warm_up``)."""

    waiting: int
    running: int
    prefilling: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_total: int
    tokens_generated: int
    requests_finished: int
    prefix_blocks_reused: int
    time_to_first_token_sum: float
    time_to_first_token_count: int
    compiles: int


@dataclasses.dataclass
class _Sequence:
    """An admitted request: its KV blocks' table, how many positions are in the cache, and the
    tokens generated so far (the newest one not yet in the cache)."""

    handle: Handle
    prompt: list[int]
    max_new: int
    table_m: np.ndarray
    computed: int
    seed: int
    tokens: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Continuous batching for one model on one mesh; thread-safe ``submit``, ``cancel`` (through
    the handle) and ``stats``; ``step`` runs in one thread at a time (``start()``'s, or yours)."""

    def __init__(self, cfg: ModelConfig, params: nnx.State, mesh: Mesh, rules: Rules, *,
                 max_batch: int = 8, max_seq_len: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, num_blocks: int | None = None,
                 prefill_chunk: int = 128, max_top_logprobs: int = 20):
        max_seq_len = max_seq_len or cfg.max_seq_len
        if cfg.attention_type == "mla":
            raise ValueError(PAGED_MLA_ERROR)
        if block_size < 1 or not 1 <= max_seq_len <= cfg.max_seq_len or max_seq_len % block_size:
            raise ValueError(f"max_seq_len must be a multiple of block_size ({block_size}) and at "
                             f"most the model's {cfg.max_seq_len}, got {max_seq_len}")
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch and prefill_chunk must be >= 1, got {max_batch}, "
                             f"{prefill_chunk}")
        self.cfg, self.graphdef = inference_graphdef(cfg)
        self.params, self.mesh, self.rules = params, mesh, rules
        self.max_batch, self.max_seq_len, self.prefill_chunk = max_batch, max_seq_len, prefill_chunk
        self.buckets, self.chunk_lengths = decode_buckets(max_batch), chunk_lengths(prefill_chunk)
        self.table_width = max_seq_len // block_size
        self.top_n = min(max_top_logprobs, cfg.vocab_size)
        self.blocks = BlockManager(num_blocks or max_batch * self.table_width + 1, block_size)
        shapes = paged_cache_shapes(self.cfg, self.blocks.num_blocks, block_size)
        self.cache_sharding = jax.tree.map(
            lambda s: logical_sharding(PAGED_CACHE_AXES, s.shape, mesh, rules), shapes)
        self.cache: Cache = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                                    out_shardings=self.cache_sharding)()
        self.compiles = 0  # programs traced (each compiled once)
        self._programs: dict[tuple[int, int], Callable] = {}
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._prefilling: list[_Sequence] = []
        self._decoding: list[_Sequence] = []
        self._next_id = 0
        self._totals = collections.Counter()
        self._ttft_sum = 0.0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None

    # --------------------------------------------------------------------------- the public API

    def submit(self, request: Request) -> Handle:
        """Queues ``request``; ValueError (one line) if it is invalid, e.g. a prompt longer than
        the context window (``max_seq_len``)."""
        self._check(request)
        with self._wake:
            if self.error is not None:
                raise RuntimeError(f"the engine has stopped after an error: {self.error}")
            handle = Handle(self._next_id, request, self._request_cancel)
            self._next_id += 1
            self._waiting.append(handle)
            self._wake.notify()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                len(self._waiting), len(self._prefilling) + len(self._decoding),
                len(self._prefilling), self.blocks.in_use, self.blocks.cached, self.blocks.usable,
                self._totals["tokens"], self._totals["finished"], self.blocks.reused_blocks,
                self._ttft_sum, self._totals["first_tokens"], self.compiles)

    def warm_up(self) -> int:
        """Compiles (and runs on padding alone, which writes only the scratch block) every chunk
        length's program and every bucket's decode program; returns ``compiles``."""
        with self._step_lock:
            for rows, length in [(1, c) for c in self.chunk_lengths] + [(b, 1) for b in self.buckets]:
                out, self.cache = self._program(rows, length)(self.params, self._rows([], rows, length),
                                                             self.cache)
            jax.block_until_ready(out)
        return self.compiles

    def step(self) -> bool:
        """One scheduler iteration (see the module docstring); False when there was nothing to run.
        The engine's lock is held only around the bookkeeping, not while the device works, so
        ``submit`` and ``stats`` answer at once."""
        with self._step_lock:
            with self._lock:
                self._end_cancelled()
                self._admit()
                decoding = list(self._decoding)
                prefill = self._prefilling[0] if self._prefilling else None
            if not decoding and prefill is None:
                return False
            decoded = chunk = None
            if decoding:  # dispatched before the chunk: the device runs both back to back
                rows = next(b for b in self.buckets if b >= len(decoding))
                batch = self._rows([(s, [s.tokens[-1]], s.computed) for s in decoding], rows, 1)
                decoded, self.cache = self._program(rows, 1)(self.params, batch, self.cache)
            if prefill is not None:
                ids = prefill.prompt[prefill.computed:prefill.computed + self.prefill_chunk]
                length = next(c for c in self.chunk_lengths if c >= len(ids))
                batch = self._rows([(prefill, ids, prefill.computed)], 1, length)
                chunk, self.cache = self._program(1, length)(self.params, batch, self.cache)
            decoded, chunk = jax.device_get((decoded, chunk))
            with self._lock:
                for row, seq in enumerate(decoding):
                    seq.computed += 1
                    self._accept(seq, *(out[row] for out in decoded))
                if prefill is not None:
                    self._advance_prefill(prefill, len(ids), chunk)
            return True

    def start(self) -> None:
        """Runs ``step`` in a background thread until ``stop()``, sleeping while there is no work."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="meshlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background thread after its current step (requests stay where they are)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------- the scheduler

    def _check(self, request: Request) -> None:
        n = len(request.prompt)
        if n == 0:
            raise ValueError("the prompt must hold at least one token")
        if n > self.max_seq_len:
            raise ValueError(f"the prompt holds {n} tokens, more than the context window of "
                             f"{self.max_seq_len}")
        if any(not 0 <= int(t) < self.cfg.vocab_size for t in request.prompt):
            raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if problems := request.sampling.problems():
            raise ValueError(problems[0].removeprefix("--").replace("top-", "top_", 1))
        if request.logprobs is not None and not 0 <= request.logprobs <= self.top_n:
            raise ValueError(f"logprobs must be in [0, {self.top_n}], got {request.logprobs}")
        if request.seed is not None and request.seed < 0:
            raise ValueError(f"seed must be >= 0, got {request.seed}")
        need = self.blocks.blocks_for(n + self._max_new(request) - 1)
        if need > self.blocks.usable:
            raise ValueError(f"the request needs {need} KV blocks, the cache has "
                             f"{self.blocks.usable}")

    def _max_new(self, request: Request) -> int:
        """New tokens the window allows: the last one is sampled at position max_seq_len - 1."""
        return min(request.max_tokens, self.max_seq_len - len(request.prompt) + 1)

    def _admit(self) -> None:
        while self._waiting and len(self._prefilling) + len(self._decoding) < self.max_batch:
            handle = self._waiting[0]
            request, prompt = handle.request, [int(t) for t in handle.request.prompt]
            max_new = self._max_new(request)
            cached = self.blocks.allocate(handle.id, prompt, len(prompt) + max_new - 1)
            if cached is None:
                return
            self._waiting.popleft()
            table = self.blocks.table(handle.id)
            table_m = np.zeros(self.table_width, np.int32)
            table_m[: len(table)] = table
            handle.cached_tokens = cached
            seed = handle.id if request.seed is None else request.seed
            self._prefilling.append(_Sequence(handle, prompt, max_new, table_m, cached, seed))

    def _end_cancelled(self) -> None:
        for handle in [h for h in self._waiting if h.cancel_requested]:
            self._waiting.remove(handle)
            self._totals["finished"] += 1
            handle.emit(Event(None, finish_reason="cancelled"))
        for seq in [s for s in self._prefilling + self._decoding if s.handle.cancel_requested]:
            self._finish(seq, Event(None, finish_reason="cancelled"))

    def _advance_prefill(self, seq: _Sequence, computed: int, chunk: tuple) -> None:
        """After a chunk of ``computed`` prompt tokens: its full blocks registered for reuse and,
        after the prompt's last chunk, its first token accepted and the sequence decoding."""
        seq.computed += computed
        self.blocks.register(seq.handle.id, seq.prompt, seq.computed)
        if seq.computed == len(seq.prompt):
            self._prefilling.remove(seq)
            self._decoding.append(seq)
            self._accept(seq, *(out[0] for out in chunk))

    def _accept(self, seq: _Sequence, token: np.ndarray, logprob: np.ndarray, top_ids: np.ndarray,
                top_logprobs: np.ndarray) -> None:
        """Hands a sampled token to its request; ends the request at a stop id or its last token."""
        request, token = seq.handle.request, int(token)
        if token in request.stop_ids:
            self._finish(seq, Event(None, finish_reason="stop"))
            return
        seq.tokens.append(token)
        self._totals["tokens"] += 1
        event = Event(token)
        if request.logprobs is not None:
            top = tuple((int(i), float(lp)) for i, lp in
                        zip(top_ids[: request.logprobs], top_logprobs[: request.logprobs], strict=True))
            event = Event(token, float(logprob), top)
        if len(seq.tokens) == seq.max_new:
            self._finish(seq, dataclasses.replace(event, finish_reason="length"))
        else:
            seq.handle.emit(event)
        if len(seq.tokens) == 1:
            self._totals["first_tokens"] += 1
            self._ttft_sum += seq.handle.first_token_at - seq.handle.submitted_at

    def _finish(self, seq: _Sequence, event: Event) -> None:
        for running in (self._prefilling, self._decoding):
            if seq in running:
                running.remove(seq)
        self.blocks.free(seq.handle.id)
        self._totals["finished"] += 1
        seq.handle.emit(event)

    def _request_cancel(self, handle: Handle) -> None:
        with self._wake:
            if not handle.done:
                handle.cancel_requested = True
                self._wake.notify()

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self.step():
                    with self._wake:
                        self._wake.wait_for(lambda: self._stopping or bool(self._waiting))
        except Exception as e:  # the device failed: every request ends with an error
            with self._lock:
                self.error = first_line(e)
                for seq in self._prefilling + self._decoding:
                    self._finish(seq, Event(None, finish_reason="error"))
                while self._waiting:
                    self._waiting.popleft().emit(Event(None, finish_reason="error"))

    # ------------------------------------------------------------------------------ programs

    def _rows(self, rows_in: list[tuple[_Sequence, list[int], int]], rows: int,
              length: int) -> dict[str, np.ndarray]:
        """The host arrays of one step: row i runs ``ids`` of ``rows_in[i]`` from position
        ``start``; the other rows and tokens are padding (at position 0, length 0)."""
        out = {"tokens": np.zeros((rows, length), np.int32),
               "positions": np.zeros((rows, length), np.int32),
               "lengths": np.zeros(rows, np.int32), "table": np.zeros((rows, self.table_width), np.int32),
               "seeds": np.zeros(rows, np.uint32), "counters": np.zeros(rows, np.int32),
               "temperature": np.zeros(rows, np.float32), "top_k": np.zeros(rows, np.int32),
               "top_p": np.ones(rows, np.float32)}
        for row, (seq, ids, start) in enumerate(rows_in):
            n, sampling = len(ids), seq.handle.request.sampling
            out["tokens"][row, :n] = ids
            out["positions"][row, :n] = np.arange(start, start + n)
            out["lengths"][row], out["table"][row] = n, seq.table_m
            out["seeds"][row], out["counters"][row] = seq.seed % 2**32, len(seq.tokens)
            out["temperature"][row], out["top_k"][row] = sampling.temperature, sampling.top_k
            out["top_p"][row] = sampling.top_p
        return out

    def _program(self, rows: int, length: int) -> Callable:
        """The jitted step over [rows, length] tokens: (outputs, cache) from (params, rows, cache)."""
        if (rows, length) not in self._programs:
            self._programs[rows, length] = self._compile(rows, length)
        return self._programs[rows, length]

    def _compile(self, rows: int, length: int) -> Callable:
        graphdef, top_n = self.graphdef, self.top_n

        def serve_step(params: nnx.State, batch: dict[str, jax.Array], cache: Cache) -> tuple:
            self.compiles += 1  # runs once per trace
            model = nnx.merge(graphdef, params)
            lengths_b = batch["lengths"]
            real_bt = jnp.arange(length)[None, :] < lengths_b[:, None]  # padding skips the experts
            logits_btv, cache = model.with_paged_cache(batch["tokens"], batch["positions"], lengths_b,
                                                       batch["table"], cache, routing_mask_bt=real_bt)
            last_bv = logits_btv[jnp.arange(rows), jnp.maximum(lengths_b - 1, 0)]
            tokens_b = sample_rows(last_bv, batch["seeds"], batch["counters"], batch["temperature"],
                                   batch["top_k"], batch["top_p"])
            return (tokens_b, *token_logprobs(last_bv, tokens_b, top_n)), cache

        shape = {"tokens": (rows, length), "positions": (rows, length),
                 "table": (rows, self.table_width)}
        batch_sh = {name: self._sharding(names, shape.get(name, (rows,)))
                    for name, names in ROW_FIELDS.items()}
        row_sh, top_sh = self._sharding(("batch",), (rows,)), self._sharding(("batch", None),
                                                                             (rows, top_n))
        params_sh = jax.tree.map(lambda x: x.sharding, self.params)
        return jax.jit(under_activation_sharding(serve_step, self.mesh, self.rules),
                       in_shardings=(params_sh, batch_sh, self.cache_sharding),
                       out_shardings=((row_sh, row_sh, top_sh, top_sh), self.cache_sharding),
                       donate_argnums=2)

    def _sharding(self, names: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
        return logical_sharding(names, shape, self.mesh, self.rules)
