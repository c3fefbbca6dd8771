"""lm-evaluation-harness adapter: a meshlm checkpoint as lm_eval's model ``meshlm`` (the command
``python -m eval harness`` is ``cli/harness.py``).

- ``loglikelihood``: every (context, continuation) becomes one token row, [BOS] + context +
  continuation (split as lm_eval's causal models split it), scored by `inference.score.Scorer` (one jitted,
  sharded forward pass per batch of rows sorted by length). A row longer than the window
  (``model.max_seq_len``, the model's own context, never ``train.seq_len``) loses context from the
  left; the continuation is always scored whole (one too long for the window is scored in window-sized pieces,
  each with the longest context that fits).
- ``loglikelihood_rolling``: the text's tokens in lm_eval's rolling windows
  (``get_rolling_token_windows`` + ``make_disjoint_window``, prefix BOS), summed.
- ``generate_until``: `inference.generate.Generator` (batched KV-cache decoding), stopping a row at EOS or
  at the first of the ``until`` strings and cutting the text there.
- chat templates (lm_eval's ``apply_chat_template=True``): lm_eval renders each context through
  `MeshLM.apply_chat_template` (the tokenizer's template, as HFLM renders it); such a context is
  scored and generated from exactly as rendered, with no prefix token of ours before it (a template
  that wants BOS writes it), as ``transformers``' ``apply_chat_template(tokenize=True)`` encodes it.

Tasks: lm_eval's own, plus the local ones in ``eval/tasks`` (``meshlm_tiny``: a multiple-choice,
a perplexity and a generation task on Python snippets, which need no download).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from core.errors import UsageError
from inference.generate import Generator
from inference.load import LoadedRun, load_run
from inference.sampling import SamplingConfig
from inference.score import Scorer

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256

log = logging.getLogger(__name__)


class QuietCustomDatasetNote(logging.Filter):
    """Drops lm_eval's note on passing kwargs to custom datasets (about its own tasks, not ours)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _batch_size(value: int | str | None) -> int:
    """lm_eval passes ints, digit strings, or "auto" (no probing here: the default)."""
    if value is None or (isinstance(value, str) and not value.strip().isdigit()):
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {value}")
    return size


@register_model("meshlm")
class MeshLM(TemplateLM):
    """A meshlm run as an lm_eval model: ``MeshLM(checkpoint=PATH)`` (run directory or
    ``checkpoints/<step>``; also ``model_args={"checkpoint": PATH}``) or ``MeshLM(run=load_run(...))``.
    ``device`` is accepted for lm_eval's sake and ignored (the run is placed on the current devices)."""

    def __init__(self, checkpoint: str | os.PathLike | None = None, *, run: LoadedRun | None = None,
                 batch_size: int | str | None = DEFAULT_BATCH_SIZE, max_batch_size: int | None = None,
                 device: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, seed: int = 0) -> None:
        super().__init__()
        if (checkpoint is None) == (run is None):
            raise ValueError("MeshLM takes either checkpoint=PATH or run=LoadedRun")
        if run is None:
            run = load_run(checkpoint)
        self.run = run
        self.tok = run.tokenizer
        self.window = run.window  # model.max_seq_len
        self._batch_size = _batch_size(batch_size)
        self._max_gen_toks = int(max_gen_toks)
        if self._max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
        self.seed = int(seed)
        if self.prefix_token_id < 0:
            raise ValueError("the tokenizer has neither a BOS nor an EOS id to start a text with")
        self.scorer = Scorer(run.cfg.model, run.params, run.mesh, run.rules, self.window, self._batch_size)
        self._generators: dict[Any, Any] = {}
        self._chat_contexts: set[str] = set()  # what apply_chat_template rendered: encoded as written
        self._generate_calls = 0
        self._truncation_warned = False
        self._system_dropped_warned = False

    # ------------------------------------------------------------------------------ lm_eval's view

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What every text starts with, as in training: BOS (EOS if the tokenizer has no BOS)."""
        return self.tok.bos_id if self.tok.bos_id >= 0 else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.window

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"meshlm-{self.tok.kind}-{self.tok.vocab_size}"

    def get_model_info(self) -> dict[str, Any]:
        return {"meshlm_run_dir": str(self.run.run_dir), "meshlm_step": self.run.step,
                "meshlm_window": self.window,
                "model_num_parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.run.params)))}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, after the prefix token unless ``add_special_tokens`` is False."""
        ids = self.tok.encode(string)
        return ids if add_special_tokens is False else [self.prefix_token_id, *ids]

    def context_ids(self, context: str) -> list[int]:
        """The ids of a request's context: a chat rendering as written, any other text after the
        prefix token."""
        return self.tok_encode(context, add_special_tokens=context not in self._chat_contexts)

    # ---------------------------------------------------------------------------- chat templates

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template lm_eval records with its results (None while chat templating is off)."""
        return getattr(self.tok, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """lm_eval's conversation (system, few-shot turns, the question) as the tokenizer's chat
        template writes it, as HFLM renders it: without a generation prompt the final (assistant)
        message stays open (``continue_final_message``), and a template that refuses the system
        message gets the conversation without it. ValueError if there is no template."""
        if getattr(self.tok, "chat_template", None) is None:
            raise ValueError(f"the checkpoint's {self.tok.kind!r} tokenizer has no chat template")
        options = {"add_generation_prompt": add_generation_prompt,
                   "continue_final_message": not add_generation_prompt}
        try:
            text = self.tok.apply_chat_template(chat_history, **options)
        except ValueError as e:
            without_system = [m for m in chat_history if m.get("role") != "system"]
            if len(without_system) == len(chat_history):
                raise
            if not self._system_dropped_warned:
                log.warning("%s: rendering conversations without their system message", e)
                self._system_dropped_warned = True
            text = self.tok.apply_chat_template(without_system, **options)
        self._chat_contexts.add(text)
        return text

    # ---------------------------------------------------------------------------------- scoring

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding produces the continuation)."""
        encoded = []
        for context, continuation in (r.args for r in requests):
            if context == "":
                encoded.append(((context, continuation), [self.prefix_token_id],
                                self.tok_encode(continuation, add_special_tokens=False)))
            else:
                context_ids, continuation_ids = self._encode_pair(context, continuation)
                if context in self._chat_contexts and len(context_ids) > 1:
                    # a chat rendering as written, without our prefix token (which a rendering of
                    # nothing but spaces keeps: the continuation needs a token before it)
                    context_ids = context_ids[1:]
                encoded.append(((context, continuation), context_ids, continuation_ids))
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **_: Any) -> list[tuple[float, bool]]:
        """Sums of the continuation tokens' log-probs and whether each is the argmax, for
        (request, context ids, continuation ids); rows are scored longest first."""
        pieces = []  # (request, row of tokens, how many of its last tokens are scored)
        for index, (_, context, continuation) in enumerate(requests):
            full = [*context, *continuation]
            start, end = len(context), len(full)
            if end - 1 > self.window and not self._truncation_warned:
                log.warning("a request of %d tokens exceeds the %d-token window: its context is cut "
                            "from the left", end, self.window)
                self._truncation_warned = True
            while end > start:  # pieces of at most `window` scored tokens, each with maximal context
                begin = max(start, end - self.window)
                pieces.append((index, full[max(0, end - self.window - 1):end], end - begin))
                end = begin
        pieces.sort(key=lambda p: -len(p[1]))
        logprob = [0.0] * len(requests)
        greedy = [True] * len(requests)
        with tqdm(total=len(pieces), disable=disable_tqdm, desc="meshlm loglikelihood") as bar:
            for start in range(0, len(pieces), self.batch_size):
                chunk = pieces[start:start + self.batch_size]
                for (index, _, n), (lp, gr) in zip(chunk, self.scorer.score([p[1] for p in chunk]),
                                                   strict=True):
                    logprob[index] += float(lp[-n:].astype(np.float64).sum())
                    greedy[index] = greedy[index] and bool(gr[-n:].all())
                bar.update(len(chunk))
        results = list(zip(logprob, greedy, strict=True))
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
        """lm_eval's disjoint rolling (context, prediction) windows over the tokens of ``string``."""
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=self.tok.encode(string), prefix_token=self.prefix_token_id,
            max_seq_len=self.window, context_len=1)]

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text | prefix token) of whole texts, over lm_eval's rolling windows."""
        windows, owners = [], []
        for index, (string,) in enumerate(r.args for r in requests):
            for context, prediction in self.rolling_windows(string):
                windows.append((None, context, prediction))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (lp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[index] += lp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------- generation

    def _generator(self, sampling: SamplingConfig) -> Generator:
        if sampling not in self._generators:
            r = self.run
            self._generators[sampling] = Generator(r.cfg.model, r.params, r.mesh, r.rules, self.window,
                                                   sampling)
        return self._generators[sampling]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context, cut at the first ``until`` string (or EOS, or after
        ``max_gen_toks``). Contexts keep their last ``max(window - max_gen_toks, window // 2)`` tokens;
        past the window the generator shifts its context."""
        out: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="meshlm generate_until")
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=None) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new < 1:
                raise ValueError(f"max_gen_toks must be >= 1, got {max_new}")
            temperature = float(kwargs.get("temperature", 1.0)) if kwargs.get("do_sample") else 0.0
            sampling = SamplingConfig(temperature, int(kwargs.get("top_k") or 0),
                                      float(kwargs.get("top_p") or 1.0))
            for problem in sampling.problems():  # "--top-p must be ..." -> "top_p must be ..."
                flag, rest = problem.split(" ", 1)
                raise ValueError(f"generation kwargs: {flag.lstrip('-').replace('-', '_')} {rest}")
            keep = max(self.window - max_new, self.window // 2, 1)
            prompts = {i: self.context_ids(requests[i].args[0])[-keep:] for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                texts = self._generate([prompts[i] for i in chunk], max_new, until, sampling)
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _generate(self, prompts: list[list[int]], max_new: int, until: list[str],
                  sampling: SamplingConfig) -> list[str]:
        """One batch (padded to the batch size with copies of its last prompt, so shapes repeat)."""
        real = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(real)]

        def on_token(row: int, token: int) -> bool:
            """True (stop this row) at a stop id (EOS, end of turn), at a complete stop string, or
            for a padding row."""
            if row >= real:
                return True
            if token in self.tok.stop_ids:
                return True
            tokens[row].append(token)
            return any(s in self.tok.decode(tokens[row]) for s in until)

        padded = prompts + [prompts[-1]] * (self.batch_size - real)
        self._generate_calls += 1
        self._generator(sampling).generate(padded, max_new, seed=self.seed + self._generate_calls,
                                           on_token=on_token)
        return [postprocess_generated_text(self.tok.decode(t), until, None) for t in tokens]


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()) -> Any:
    """A TaskManager that knows ``tasks``: the local ones (and ``include_paths``) alone when they
    suffice (indexing lm_eval's own ~15k tasks takes seconds), else those too. UsageError naming
    the unknown tasks."""
    paths = [TASKS_DIR, *map(Path, include_paths)]

    def unknown(manager: Any) -> list[str]:
        names = manager.all_tasks
        return [t for t in tasks if not fnmatch.filter(names, t)]

    manager = TaskManager(include_path=paths, include_defaults=False)
    if unknown(manager):
        manager = TaskManager(include_path=paths)
        if missing := unknown(manager):
            local = TaskManager(include_path=paths, include_defaults=False).all_tasks
            raise UsageError(f"unknown task {', '.join(missing)} (local tasks: {', '.join(local)}; "
                             "other lm_eval tasks need their datasets, which cannot be downloaded here)")
    return manager


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task (and group): its metrics, without lm_eval's alias entries."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            out[task] = {k: v for k, v in metrics.items() if k != "alias"}
    return out
