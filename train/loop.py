"""The training loop: build the mesh and sharded state (or resume it), jit the steps once, then
run -- batches in, bounded steps in flight, metrics out, asynchronous checkpoints, a final
evaluation and a short sample.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml

from data.batches import equalize_across_processes, to_global
from data.pipeline import Shard, empty_batch, eval_batches, regroup_state, train_dataset
from data.sources import open_source
from data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer, make_tokenizer, save_tokenizer
from eval.generate import generate
from model.flops import param_counts, peak_flops, train_flops_per_token
from sharding.constrain import activation_sharding
from sharding.mesh import make_mesh
from sharding.rules import default_rules
from train.checkpoint import Checkpointer
from train.config import Config, ConfigError, dump_yaml
from train.metrics import MetricsWriter, progress_bar, write_expert_load_png
from train.optimizer import make_optimizer
from train.state import TrainState, abstract_state, init_state, state_shardings
from train.step import batch_sharding, jit_eval_step, jit_train_step


def prepare_run_dir(cfg: Config) -> Path:
    """Creates the run directory, or checks that an existing one trained the same model."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.is_file():
        try:
            previous = yaml.safe_load(saved.read_text()) or {}
        except yaml.YAMLError:
            raise ConfigError("run.dir", f"{saved} is not valid YAML") from None
        defaults = Config().to_dict()["model"]  # keys added since that run take their defaults
        if {**defaults, **(previous.get("model") or {})} != cfg.to_dict()["model"]:
            raise ConfigError("run.dir", f"{run_dir} holds a run of a different model; choose "
                              "another run.dir or keep the model.* settings")
    sync_processes("meshlm: run directory checked")  # every process read it before it changes
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".yaml.tmp")
        tmp.write_text(dump_yaml(cfg))
        tmp.replace(saved)
    return run_dir


def sync_processes(name: str) -> None:
    """Every process waits here until all have arrived (files written by process 0 are visible)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: the one saved in the run directory when resuming, else a new one."""
    resuming = (run_dir / TOKENIZER_FILE).is_file()
    sync_processes("meshlm: tokenizer looked up")  # before process 0 may write it
    if resuming:
        return load_tokenizer(run_dir)
    tokenizer = make_tokenizer(cfg.data.tokenizer)
    if jax.process_index() == 0:
        save_tokenizer(tokenizer, run_dir)
    return tokenizer


def data_streams(cfg: Config, tokenizer) -> tuple[Any, list]:
    """(training batch iterator, evaluation batches) of this process's rows."""
    d, t = cfg.data, cfg.train
    shard = Shard(jax.process_index(), jax.process_count())
    local_batch = t.batch_size // shard.count
    kwargs = {"eval_fraction": d.eval_fraction, "data_dir": d.data_dir or None,
              "cache_dir": d.cache_dir or None}

    def open_splits() -> tuple:
        return open_source(d.source, "train", **kwargs), open_source(d.source, "eval", **kwargs)

    if shard.index == 0:  # process 0 prepares text: sources once; the others then reuse them
        train_docs, eval_docs = open_splits()
    sync_processes("meshlm: data sources prepared")
    if shard.index != 0:
        train_docs, eval_docs = open_splits()
    iterator = iter(train_dataset(train_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                                  seed=t.seed, shard=shard, streams=d.streams,
                                  prefetch=d.prefetch, shuffle_tokens=d.shuffle_tokens))
    batches = eval_batches(eval_docs, tokenizer, seq_len=t.seq_len, batch_size=local_batch,
                           max_batches=t.eval_batches, shard=shard)
    return iterator, equalize_across_processes(batches, empty_batch(local_batch, t.seq_len))


def evaluate(eval_step, params, batches, batch_sh, batch_size) -> float:
    """Mean token loss over the evaluation batches."""
    loss_sum = weight_sum = 0.0
    for local in batches:
        out = jax.device_get(eval_step(params, to_global(local, batch_sh, batch_size)))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    return loss_sum / max(weight_sum, 1.0)


def train(cfg: Config) -> dict[str, Any]:
    """Runs (or resumes) the job described by ``cfg``; returns a summary of the last step."""
    run_dir = prepare_run_dir(cfg)
    mesh, rules = make_mesh(cfg.mesh), default_rules()
    t, m = cfg.train, cfg.model
    sync_processes("meshlm: run directory prepared")
    try:
        tokenizer = run_tokenizer(cfg, run_dir)
        batches, eval_data = data_streams(cfg, tokenizer)
    except ValueError as e:  # unreadable files, empty globs, unknown datasets: the user's input
        raise ConfigError("data", str(e)) from None
    tx, schedule = make_optimizer(cfg.optim, t.steps)
    writer = MetricsWriter(run_dir, cfg.run.tensorboard)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)

    with activation_sharding(mesh, rules):
        graphdef, abstract = abstract_state(m, tx, t.seed)
        state_sh = state_shardings(abstract, mesh, rules)
        start = checkpointer.latest_step() or 0
        if start:
            try:
                state, _, data_states = checkpointer.restore(start, abstract, state_sh)
                shard = Shard(jax.process_index(), jax.process_count())
                batches.set_state(regroup_state(data_states, shard, cfg.data.streams))
            except ValueError as e:
                raise ConfigError("run.dir", f"cannot resume from checkpoint {start}: "
                                  f"{str(e).splitlines()[0]}") from None
        else:
            state = init_state(m, tx, t.seed, state_sh)
        batch_sh = batch_sharding(mesh, rules, t.batch_size, t.seq_len)
        train_step = jit_train_step(graphdef, tx, schedule, t.microbatches, state_sh, batch_sh)
        eval_step = jit_eval_step(graphdef, state_sh.params, batch_sh)

        peak, peak_source = peak_flops(cfg.run.peak_flops)
        flops_per_token = train_flops_per_token(m, t.seq_len)
        tokens_per_step = t.batch_size * t.seq_len
        counts = param_counts(m)
        if jax.process_index() == 0:
            active = f" ({counts['active'] / 1e6:.2f}M active)" if m.is_moe else ""
            print(f"meshlm: {counts['total'] / 1e6:.2f}M parameters{active} on mesh "
                  f"{dict(mesh.shape)} ({jax.device_count()} {jax.default_backend()} devices); "
                  f"steps {start}->{t.steps}; peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); "
                  f"run dir {run_dir}", flush=True)

        bar = progress_bar(t.steps, start, cfg.run.progress)
        in_flight: collections.deque[tuple[int, dict]] = collections.deque()
        last: dict[str, Any] = {"step": start}
        clock = {"time": None, "step": start}
        load_sum = {"total": 0.0, "steps": 0}  # MoE: summed [MoE layers, experts] load, for the picture

        def drain(limit: int) -> None:
            """Fetches metrics of the oldest steps until at most ``limit`` remain in flight."""
            while len(in_flight) > limit:
                step, metrics = in_flight.popleft()
                values = {k: v.tolist() if np.ndim(v) else float(v)  # MoE per-layer lists
                          for k, v in jax.device_get(metrics).items()}
                if "expert_load" in values:
                    load_sum["total"] = load_sum["total"] + np.asarray(values["expert_load"])
                    load_sum["steps"] += 1
                now = time.perf_counter()
                bar.update(1)
                last.update(step=step, **values)
                if clock["time"] is None:  # the first step includes compilation: time from here
                    clock.update(time=now, step=step)
                if step % t.log_every == 0 or step == t.steps:
                    elapsed = now - clock["time"]
                    tps = (step - clock["step"]) * tokens_per_step / elapsed if elapsed > 0 else 0.0
                    mfu = tps * flops_per_token / peak if peak else 0.0
                    last.update(tokens_per_s=tps, mfu=mfu)
                    writer.write({"step": step, **values, "tokens_per_s": tps, "mfu": mfu})
                    bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}",
                                    mfu=f"{mfu:.1%}")
                    clock.update(time=now, step=step)

        for step in range(start, t.steps):
            batch = to_global(next(batches), batch_sh, t.batch_size)
            state, metrics = train_step(state, batch)
            in_flight.append((step + 1, metrics))
            drain(t.steps_in_flight)
            done = step + 1
            if cfg.checkpoint.every and done % cfg.checkpoint.every == 0 and done != t.steps:
                checkpointer.save(done, state, {"step": done}, batches.get_state())
            if t.eval_every and done % t.eval_every == 0 and done != t.steps and eval_data:
                drain(0)
                eval_loss = evaluate(eval_step, state.params, eval_data, batch_sh, t.batch_size)
                writer.write({"step": done, "eval_loss": eval_loss})
        drain(0)
        bar.close()

        final_step = max(start, t.steps)  # a run resumed past train.steps trains no further
        if checkpointer.latest_step() != final_step:
            checkpointer.save(final_step, state, {"step": final_step}, batches.get_state())
        if eval_data:
            last["eval_loss"] = evaluate(eval_step, state.params, eval_data, batch_sh, t.batch_size)
            writer.write({"step": final_step, "eval_loss": last["eval_loss"]})
        if load_sum["steps"] and jax.process_index() == 0:
            moe_layer_ids = [m.first_dense_layers + (i + 1) * m.moe_every - 1
                             for i in range(m.num_moe_layers)]
            write_expert_load_png(run_dir / "expert_load.png", load_sum["total"] / load_sum["steps"],
                                  moe_layer_ids, f"expert load, mean over steps "
                                  f"{final_step - load_sum['steps'] + 1}-{final_step} "
                                  f"({m.num_experts} experts, top-{m.experts_per_token})")
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        batches.close()

        if t.sample_tokens:  # every process takes part (params span them); process 0 prints
            print_sample(cfg, state, graphdef, tokenizer)
    return last


def print_sample(cfg: Config, state: TrainState, graphdef, tokenizer) -> None:
    prompt = cfg.train.sample_prompt
    ids = ([tokenizer.bos_id] if tokenizer.bos_id >= 0 else []) + tokenizer.encode(prompt)
    new = list(generate(state.params, graphdef, ids, cfg.train.sample_tokens,
                        window=cfg.train.seq_len, temperature=0.8, seed=cfg.train.seed,
                        stop_id=tokenizer.eos_id))
    if jax.process_index() != 0:
        return
    print("--- sample (temperature 0.8) ---")
    print(prompt + tokenizer.decode(new))
    print("--- end of sample ---", flush=True)


def losses_of(run_dir: str | Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl (the last record of a step wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[int(record["step"])] = record["loss"]
    return out

