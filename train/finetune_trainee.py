"""The fine-tune trainee: a base run's weights restored onto the mesh, then either LoRA adapters
trained over the frozen base (checkpoints hold only the adapters, their optimizer state and a
reference to the base checkpoint) or every weight trained with a fresh optimizer from step 0 (MoE
routers optionally frozen; checkpoints hold the whole model, like pre-training's). Frozen state is
passed to the jitted steps beside the TrainState: never differentiated, updated or donated.

A preference objective (``finetune.objective=dpo|simpo``, ``train/preference.py``) trains on pairs.
DPO's reference is the base model: with LoRA, the same frozen base weights run without the adapters
(the plain graph merged with the frozen state: no extra memory); with full fine-tuning, a copy of
the base weights kept as frozen state beside the trained ones (one more model's parameters per
device, sharded like them: AdamW's state grows from 3x to 4x the parameter bytes).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from core.errors import ConfigError, first_line
from model.flops import frozen_train_flops_per_token
from model.lora import (
    LoRAKey,
    LoRAParam,
    LoRASpec,
    add_lora,
    merge_lora,
    set_deterministic,
    unmatched_targets,
    with_dropout_keys,
)
from model.transformer import Transformer
from sharding.constrain import constrain
from sharding.rules import Rules, tree_shardings
from train.checkpoint import MANIFEST, Checkpointer, file_digest, warn
from train.config import CheckpointConfig, Config
from train.preference import Objective, preference_eval_step, preference_train_step
from train.run_dir import RunDir
from train.state import TrainState
from train.trainee import EvalFn, StepFn, Trainee, count

ROUTER = "w_router_de"


def lora_spec(cfg: Config) -> LoRASpec:
    ft = cfg.finetune
    return LoRASpec(rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout,
                    targets=ft.targets, experts=ft.lora_experts)


def trainable_filter(cfg: Config) -> Any:
    """Which variables a fine-tune trains: the adapters (LoRA), or every parameter but the MoE
    routers when they are frozen, or every parameter."""
    if cfg.finetune.method == "lora":
        return LoRAParam
    if cfg.finetune.freeze_router:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(ROUTER)))
    return nnx.Param


def base_reference(base_dir: Path, step: int) -> dict[str, Any]:
    """What a fine-tune's checkpoints record of the base checkpoint they start from."""
    manifest = RunDir(base_dir).checkpoints / str(step) / MANIFEST
    return {"base_run": str(base_dir), "base_step": step,
            "base_manifest_sha256": file_digest(manifest) if manifest.is_file() else ""}


class FinetuneTrainee(Trainee):
    """``cfg.finetune`` resolved (see ``train/finetune_config.py``): ``base`` is an absolute run
    directory, ``base_step`` one of its checkpoints, ``cfg.model`` the base's model."""

    def __init__(self, cfg: Config, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules):
        self.cfg, self.tx, self.mesh, self.rules = cfg, tx, mesh, rules
        ft = cfg.finetune
        self.base_dir, self.base_step = Path(ft.base), ft.base_step
        self.lora = ft.method == "lora"
        self.filter = trainable_filter(cfg)
        plain = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
        self.plain_graphdef, self.plain_abstract = nnx.split(plain)
        self.plain_sh = tree_shardings(self.plain_abstract, mesh, rules)
        model = nnx.eval_shape(lambda: self.attach(Transformer(cfg.model, nnx.Rngs(0))))
        self.graphdef, trainable, frozen = nnx.split(model, self.filter, ...)
        self.eval_graphdef = nnx.split(set_deterministic(model, True), self.filter, ...)[0]
        step = jax.ShapeDtypeStruct((), jnp.int32)
        self.abstract = TrainState(step, trainable, jax.eval_shape(tx.init, trainable))
        self.shardings = tree_shardings(self.abstract, mesh, rules)
        self.frozen_abstract, self.frozen_shardings = frozen, tree_shardings(frozen, mesh, rules)
        self.frozen = None  # set by init / from_checkpoint
        self.objective = Objective.of(ft) if ft.objective != "sft" else None
        # full fine-tuning with DPO: the base weights, laid out like a plain model's
        self.keeps_reference = self.objective is not None and self.objective.kind == "dpo" \
            and not self.lora
        self.reference: nnx.State | None = None
        if self.lora and (unmatched := unmatched_targets(cfg.model, lora_spec(cfg))):
            warn(f"LoRA targets {', '.join(unmatched)} match no weight of this model: skipped")
        if self.lora:
            self._checkpoint = (self.abstract, self.shardings)
        else:  # the whole model, as pre-training saves it: eval and export read it directly
            self._checkpoint = (TrainState(step, self.plain_abstract, self.abstract.opt_state),
                                TrainState(self.shardings.step, self.plain_sh,
                                           self.shardings.opt_state))

    def attach(self, model: nnx.Module) -> nnx.Module:
        """``model`` with fresh adapters (LoRA; seeded by train.seed), else as it is."""
        if self.lora:
            add_lora(model, lora_spec(self.cfg), nnx.Rngs(self.cfg.train.seed))
        return model

    def build(self, base: nnx.State) -> nnx.Module:
        """The model with ``base``'s weights (and fresh adapters for LoRA)."""
        return self.attach(nnx.merge(self.plain_graphdef, base))

    # ---------------------------------------------------------------------------- the base run

    def load_base(self, step: int) -> nnx.State:
        """The base run's parameters at ``step``, restored onto the mesh (manifest verified)."""
        checkpointer = Checkpointer(self.base_dir, CheckpointConfig(), read_only=True)
        try:
            return checkpointer.restore_params(step, self.plain_abstract, self.plain_sh)
        except Exception as e:  # orbax raises many types for damaged or foreign files
            raise ConfigError("finetune.base", f"cannot restore checkpoint {step} of the base run "
                              f"{self.base_dir}: {first_line(e)}") from None
        finally:
            checkpointer.close()

    def split_base(self, base: nnx.State) -> tuple[nnx.State, nnx.State]:
        """(trainable, frozen) of the model built on ``base`` (the base's buffers are donated)."""
        build = jax.jit(lambda b: nnx.split(self.build(b), self.filter, ...)[1:],
                        in_shardings=(self.plain_sh,),
                        out_shardings=(self.shardings.params, self.frozen_shardings), donate_argnums=0)
        return build(base)

    def init(self) -> TrainState:
        base = self.load_base(self.base_step)
        if self.keeps_reference:  # a copy: split_base donates the base's buffers
            self.reference = jax.jit(lambda b: jax.tree.map(jnp.copy, b), in_shardings=(self.plain_sh,),
                                     out_shardings=self.plain_sh)(base)
        params, self.frozen = self.split_base(base)
        opt_init = jax.jit(self.tx.init, in_shardings=(self.shardings.params,),
                           out_shardings=self.shardings.opt_state)
        zero = jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)
        return TrainState(zero, params, opt_init(params))

    # ------------------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_abstract(self) -> tuple[Any, Any]:
        return self._checkpoint

    def to_checkpoint(self, state: TrainState) -> Any:
        if self.lora:
            return state
        return TrainState(state.step, nnx.merge_state(state.params, self.frozen), state.opt_state)

    def check_base(self, meta: dict[str, Any]) -> None:
        """ValueError unless the checkpoint record ``meta`` names this base checkpoint, unchanged."""
        recorded = (meta.get("base_run"), meta.get("base_step"))
        if recorded != (str(self.base_dir), self.base_step):
            raise ValueError(f"it was fine-tuned from {recorded[0]} step {recorded[1]}, not from "
                             f"finetune.base={self.base_dir} step {self.base_step}")
        digest = base_reference(self.base_dir, self.base_step)["base_manifest_sha256"]
        if meta.get("base_manifest_sha256", digest) != digest:
            raise ValueError(f"checkpoint {self.base_step} of the base run {self.base_dir} was "
                             "replaced since this fine-tune started from it")

    def from_checkpoint(self, saved: Any, meta: dict[str, Any]) -> TrainState:
        self.check_base(meta)
        if self.lora:
            self.frozen = self.split_base(self.load_base(self.base_step))[1]
            return saved
        params, self.frozen = nnx.split_state(saved.params, self.filter, ...)
        if self.keeps_reference:
            self.reference = self.load_base(self.base_step)
        return TrainState(saved.step, params, saved.opt_state)

    def checkpoint_meta(self) -> dict[str, Any]:
        ft = self.cfg.finetune
        meta = {"method": ft.method, **base_reference(self.base_dir, self.base_step)}
        if self.lora:
            meta["lora"] = {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": list(ft.targets),
                            "experts": ft.lora_experts}
        return meta

    # ------------------------------------------------------------------------- steps and models

    def step_frozen(self) -> Any:
        if self.objective is None:
            return self.frozen
        return {"model": self.frozen, **({"reference": self.reference} if self.keeps_reference else {})}

    def step_frozen_layout(self) -> tuple[Any, Any]:
        if self.objective is None:
            return self.frozen_abstract, self.frozen_shardings
        abstract, shardings = {"model": self.frozen_abstract}, {"model": self.frozen_shardings}
        if self.keeps_reference:
            abstract["reference"], shardings["reference"] = self.plain_abstract, self.plain_sh
        return abstract, shardings

    def reference_model(self, frozen: dict) -> nnx.Module | None:
        """DPO's reference model from the steps' frozen input: the kept base weights (full
        fine-tuning), or the frozen base weights without the adapters (LoRA); None for SimPO."""
        if self.objective is None or self.objective.kind != "dpo":
            return None
        if "reference" in frozen:
            return nnx.merge(self.plain_graphdef, frozen["reference"])
        return nnx.merge(self.plain_graphdef, nnx.split_state(frozen["model"], LoRAKey, ...)[1])

    def train_fn(self, schedule: optax.Schedule) -> StepFn:
        """The train step; LoRA dropout draws fresh masks every step (see ``with_dropout``)."""
        if self.objective is None:
            step_fn = super().train_fn(schedule)
        else:
            step_fn = functools.partial(preference_train_step, graphdef=self.graphdef, tx=self.tx,
                                        schedule=schedule, objective=self.objective,
                                        reference=self.reference_model,
                                        microbatches=self.cfg.train.microbatches)
        if not (self.lora and self.cfg.finetune.lora_dropout > 0):
            return step_fn

        def with_fresh_dropout(state: TrainState, batch: dict, frozen: nnx.State) -> tuple:
            return step_fn(state, *self.with_dropout(state.step, batch, frozen))

        return with_fresh_dropout

    def eval_fn(self) -> EvalFn:
        if self.objective is None:
            return super().eval_fn()
        return functools.partial(preference_eval_step, graphdef=self.eval_graphdef,
                                 objective=self.objective, reference=self.reference_model)

    def with_dropout(self, step: jax.Array, batch: dict, frozen: nnx.State) -> tuple[dict, nnx.State]:
        """(``batch`` with ``rows``, each row's index in it; ``frozen`` with the dropout keys of
        ``step``): a row's masks are a function of (seed, step, adapter, layer, row), so a resumed
        run draws the same ones and microbatches draw those of the whole batch."""
        rows_b = constrain(jnp.arange(batch["inputs"].shape[0], dtype=jnp.int32), ("batch",))
        return {**batch, "rows": rows_b}, with_dropout_keys(frozen, step, self.cfg.train.seed)

    def plain_model(self, state: TrainState) -> tuple[nnx.GraphDef, nnx.State]:
        if not self.lora:
            return self.plain_graphdef, nnx.merge_state(state.params, self.frozen)
        return self.plain_graphdef, self.merged_params(state.params)

    def merged_params(self, adapters: nnx.State) -> nnx.State:
        """The base weights with the adapters merged in, laid out like a plain model's."""
        def merge(trainable: nnx.State, frozen: nnx.State) -> nnx.State:
            return nnx.state(merge_lora(nnx.merge(self.eval_graphdef, trainable, frozen)))

        return jax.jit(merge, in_shardings=(self.shardings.params, self.frozen_shardings),
                       out_shardings=self.plain_sh)(adapters, self.frozen)

    def flops_per_token(self) -> float:
        """Full fine-tuning: 6N. LoRA: the frozen weights get no weight gradients (4N + 6 N_lora)."""
        if self.cfg.finetune.method != "lora":
            return super().flops_per_token()
        return frozen_train_flops_per_token(self.cfg.model, self.cfg.train.seq_len,
                                            count(self.abstract.params))

    def trainable_counts(self) -> tuple[int, int]:
        trainable = count(self.abstract.params)
        frozen = count(nnx.split_state(self.frozen_abstract, LoRAKey, ...)[1])
        return trainable, trainable + frozen
