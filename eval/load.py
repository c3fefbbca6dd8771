"""Loading a trained run for evaluation: its resolved config, its tokenizer, and its parameters
restored onto the current devices, whatever mesh trained them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh

from data.tokenizer import Tokenizer, load_tokenizer
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import Rules, default_rules, tree_shardings
from train.config import Config, ConfigError, config_from_dict


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    tokenizer: Tokenizer
    graphdef: nnx.GraphDef
    params: nnx.State
    mesh: Mesh
    rules: Rules
    step: int
    run_dir: Path


def resolve_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """(run directory, step or None for the latest) from a run directory or a step directory."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        if not path.name.isdigit():
            raise ValueError(f"{path} is not a checkpoint step directory")
        if not path.is_dir():
            raise ValueError(f"{path} does not exist")
        return path.parent.parent, int(path.name)
    raise ValueError(f"{path} is neither a meshlm run directory (with config.yaml) nor one of its "
                     "checkpoints/<step> directories")


def read_run_config(run_dir: Path) -> Config:
    try:
        raw = yaml.safe_load((run_dir / "config.yaml").read_text())
        return config_from_dict(raw)
    except (yaml.YAMLError, ConfigError, TypeError, AttributeError) as e:
        raise ValueError(f"{run_dir / 'config.yaml'} is not a valid meshlm config ({e})") from None


def eval_mesh_config(cfg: Config) -> MeshConfig:
    """The mesh the run trained on when it fits the devices here, else every device on ``data``."""
    try:
        cfg.mesh.sizes(jax.device_count())
        return cfg.mesh
    except ValueError:
        return MeshConfig()


def load_run(path: str | Path, mesh_cfg: MeshConfig | None = None) -> LoadedRun:
    """Restores the parameters of ``path`` (latest step of a run, or one step directory)."""
    from train.checkpoint import Checkpointer

    run_dir, step = resolve_checkpoint(path)
    cfg = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    kind = cfg.data.tokenizer.partition(":")[0]
    if kind != "run" and tokenizer.kind != kind:  # "run:DIR" names another run's tokenizer, any kind
        raise ValueError(f"the tokenizer in {run_dir} is {tokenizer.kind!r} but the run was trained "
                         f"with data.tokenizer={cfg.data.tokenizer!r}: they do not belong together")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer in {run_dir} has {tokenizer.vocab_size} ids but the model "
                         f"only {cfg.model.vocab_size}: they do not belong together")
    mesh, rules = make_mesh(mesh_cfg or eval_mesh_config(cfg)), default_rules()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    checkpointer = Checkpointer(run_dir, cfg.checkpoint, read_only=True)  # the run may be live
    try:
        steps = checkpointer.all_steps()
        if step is None:
            if not steps:
                raise ValueError(f"{run_dir} has no complete checkpoint")
            step = max(steps)
        elif step not in steps:
            raise ValueError(f"checkpoint {step} in {run_dir} is missing or incomplete "
                             f"(complete: {sorted(steps) or 'none'})")
        try:
            params = checkpointer.restore_params(step, abstract, tree_shardings(abstract, mesh, rules))
        except Exception as e:  # orbax raises many types for damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot restore checkpoint {step} of {run_dir}: {first}") from None
    finally:
        checkpointer.close()
    return LoadedRun(cfg, tokenizer, graphdef, params, mesh, rules, step, run_dir)
