"""Fine-tuning from any meshlm run directory (trained or imported), and merging LoRA adapters:

    python -m train.finetune [CONFIG.yaml] [section.key=value ...]   (default configs/finetune_lora.yaml)
    python -m train.finetune merge ADAPTER_RUN OUT_RUN

The first trains like ``python -m train`` (which also fine-tunes when ``finetune.base`` is set); the
model section and the tokenizer come from the base run. ``merge`` writes OUT_RUN, a plain run
directory whose checkpoint holds the base weights with the adapters added in (for ``python -m eval``
and export). Mistakes print one ``error:`` line and exit 2.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from train.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    FinetuneConfig,
    build_config,
    config_from_dict,
    load_yaml,
    parse_override,
)

DEFAULT_FINETUNE_PRESET = CONFIG_DIR / "finetune_lora.yaml"
# Model keys a fine-tune may set differently from its base: they change how it runs, not its weights.
RUNTIME_MODEL_KEYS = ("dtype", "remat", "scan_layers", "attention_impl", "attention_block",
                      "loss_chunk", "moe_impl", "capacity_factor", "aux_loss_coef", "z_loss_coef")
USAGE = """usage: python -m train.finetune [CONFIG.yaml] [section.key=value ...]
       python -m train.finetune merge ADAPTER_RUN OUT_RUN

Fine-tunes finetune.base=RUN_DIR (default CONFIG: configs/finetune_lora.yaml), e.g.
  python -m train.finetune finetune.base=runs/tiny data.source=text:notes/*.txt run.dir=runs/ft
  python -m train.finetune configs/finetune_full.yaml finetune.base=runs/moe finetune.freeze_router=true
merge writes a plain run directory whose checkpoint holds the base weights plus the adapters."""


def read_run(run_dir: Path) -> Config:
    """The saved config of a run directory; ValueError if it has none or it is invalid."""
    path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} does not exist")
    if not path.is_file():
        raise ValueError(f"{run_dir} is not a meshlm run directory (it has no config.yaml)")
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid meshlm config ({e})") from None


def committed_steps(run_dir: Path) -> list[int]:
    """The run's committed checkpoint steps (unfinished saves have a suffix and are not listed)."""
    directory = run_dir / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def base_tokenizer_spec(base_dir: Path) -> str:
    """A ``data.tokenizer`` spec that rebuilds exactly the tokenizer saved in ``base_dir``."""
    from data.tokenizer import load_tokenizer

    return "byte" if load_tokenizer(base_dir).kind == "byte" else f"run:{base_dir}"


def resolve_finetune(cfg: Config, model_keys: dict[str, Any]) -> Config:
    """``cfg`` with its model, tokenizer and base checkpoint taken from ``finetune.base``.

    ``model_keys`` are the model settings the preset and overrides gave; any that differs from the
    base run's (other than RUNTIME_MODEL_KEYS) is a ConfigError, as is a missing or unusable base."""
    ft = cfg.finetune
    base_dir = Path(ft.base).expanduser().resolve()
    try:
        base = read_run(base_dir)
        tokenizer = base_tokenizer_spec(base_dir)
    except ValueError as e:
        raise ConfigError("finetune.base", str(e)) from None
    if base.finetune.base and base.finetune.method == "lora":
        raise ConfigError("finetune.base", f"{base_dir} holds LoRA adapters, not a model: merge them "
                          "first (python -m train.finetune merge ADAPTER_RUN OUT_RUN)")
    steps = committed_steps(base_dir)
    if not steps:
        raise ConfigError("finetune.base", f"{base_dir} has no complete checkpoint")
    step = ft.base_step or pinned_base_step(cfg, base_dir) or max(steps)
    if step not in steps:
        raise ConfigError("finetune.base_step", f"{base_dir} has no checkpoint {step} (it has "
                          f"{', '.join(map(str, steps))})")
    given = build_config({"model": dict(model_keys)}, []).model
    runtime = {}
    for key in model_keys:
        ours, theirs = getattr(given, key), getattr(base.model, key)
        if key in RUNTIME_MODEL_KEYS:
            runtime[key] = ours
        elif ours != theirs:
            raise ConfigError(f"model.{key}", f"the model comes from the base run {base_dir} "
                              f"({key}={theirs}); remove this setting (got {ours})")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(base.model, **runtime),
        data=dataclasses.replace(cfg.data, tokenizer=tokenizer),
        finetune=dataclasses.replace(ft, base=str(base_dir), base_step=step))


def pinned_base_step(cfg: Config, base_dir: Path) -> int:
    """The base step an existing fine-tune in ``run.dir`` started from (so resuming it keeps its
    base when the base run has moved on), or 0."""
    try:
        previous = read_run(Path(cfg.run.dir)).finetune
    except ValueError:
        return 0
    return previous.base_step if previous.base == str(base_dir) else 0


def load_run_config(path: str | Path | None, overrides: list[str], *,
                    finetune: bool = False) -> Config:
    """Config from a preset and overrides (as ``train.config.load_config``), resolved against
    ``finetune.base`` when it is set; ``finetune=True`` requires it. Without a preset, a fine-tune
    starts from configs/finetune_lora.yaml (whose model section is empty), else configs/default.yaml."""
    from train.config import DEFAULT_PRESET

    finetuning = finetune or any(o.startswith("finetune.base=") for o in overrides)
    raw = load_yaml(path or (DEFAULT_FINETUNE_PRESET if finetuning else DEFAULT_PRESET))
    cfg = build_config(raw, overrides)
    if not cfg.finetune.base:
        if finetune:
            raise ConfigError("finetune.base", "required: the run directory to fine-tune "
                              "(finetune.base=RUN_DIR)")
        return cfg
    model_keys = dict(raw.get("model") or {})
    for text in overrides:
        section, key, value = parse_override(text)
        if section == "model":
            model_keys[key] = value
    return resolve_finetune(cfg, model_keys)


# -------------------------------------------------------------------------------------- merging


def merge_run(adapter_run: str | Path, out_run: str | Path) -> dict[str, Any]:
    """Writes ``out_run``: ``adapter_run``'s config (finetune section cleared), tokenizer, and its
    latest checkpoint with the adapters merged into the base weights; returns a summary.
    ValueError for an unusable adapter run or an existing ``out_run``."""
    import jax

    from sharding.constrain import activation_sharding
    from sharding.mesh import make_mesh
    from sharding.rules import default_rules
    from train.checkpoint import RUN_FILES, Checkpointer
    from train.finetune_state import FinetuneTrainee
    from train.optimizer import make_optimizer
    from train.state import TrainState

    adapter_run, out_run = Path(adapter_run).resolve(), Path(out_run).resolve()
    cfg = read_run(adapter_run)
    if not (cfg.finetune.base and cfg.finetune.method == "lora"):
        raise ValueError(f"{adapter_run} is not a LoRA fine-tune run (finetune.method=lora)")
    steps = committed_steps(adapter_run)
    if not steps:
        raise ValueError(f"{adapter_run} has no complete checkpoint")
    if out_run.exists() and any(out_run.iterdir()):
        raise ValueError(f"{out_run} exists and is not empty: choose a new directory")
    from eval.load import eval_mesh_config

    mesh, rules = make_mesh(eval_mesh_config(cfg)), default_rules()
    step = max(steps)
    with activation_sharding(mesh, rules):
        trainee = FinetuneTrainee(cfg, make_optimizer(cfg.optim, cfg.train.steps)[0], mesh, rules)
        source = Checkpointer(adapter_run, cfg.checkpoint, read_only=True)
        try:
            adapters = source.restore_params(step, trainee.abstract.params,
                                             trainee.shardings.params)
            trainee.check_base(source.restore_meta(step))
        except Exception as e:  # orbax raises many types for damaged files
            raise ValueError(f"cannot restore checkpoint {step} of {adapter_run}: "
                             f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
        finally:
            source.close()
        trainee.frozen = trainee.split_base(trainee.load_base(trainee.base_step))[1]
        _, params = trainee.plain_model(TrainState(None, adapters, None))
        out_cfg = dataclasses.replace(cfg, finetune=FinetuneConfig(),
                                      run=dataclasses.replace(cfg.run, dir=str(out_run)))
        if jax.process_index() == 0:
            out_run.mkdir(parents=True, exist_ok=True)
            (out_run / "config.yaml").write_text(yaml.safe_dump(out_cfg.to_dict(), sort_keys=False))
            for name in RUN_FILES:  # the tokenizer, as the adapter run saved it
                if (adapter_run / name).is_file():
                    shutil.copy2(adapter_run / name, out_run / name)
        target = Checkpointer(out_run, dataclasses.replace(cfg.checkpoint, async_save=False))
        meta = {"step": step, "merged_from": str(adapter_run), **trainee.checkpoint_meta()}
        target.save(step, TrainState(jax.numpy.asarray(step, jax.numpy.int32), params, None), meta, {})
        target.close()
    return {"out_run": str(out_run), "step": step, "base_run": cfg.finetune.base,
            "base_step": cfg.finetune.base_step}


def merge_main(args: list[str]) -> int:
    from train.__main__ import setup_devices
    from train.config import one_line

    if len(args) != 2 or any(a.startswith("-") for a in args):
        print("error: usage: python -m train.finetune merge ADAPTER_RUN OUT_RUN", file=sys.stderr)
        return 2
    try:
        cfg = read_run(Path(args[0]).resolve())
        setup_devices(dataclasses.replace(cfg.run, distributed=False))
        summary = merge_run(*args)
    except ValueError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(f"meshlm: merged the adapters of {args[0]} (step {summary['step']}) into "
          f"{summary['base_run']} step {summary['base_step']}: {summary['out_run']}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    from sharding.host import quiet_tpu_probe

    quiet_tpu_probe()  # before JAX loads
    if argv and argv[0] == "merge":
        return merge_main(argv[1:])
    from train.__main__ import main as train_main

    return train_main(argv, finetune=True)


if __name__ == "__main__":
    sys.exit(main())
