"""Loading a trained run for inference: its resolved config, its tokenizer, and its parameters
restored onto the current devices, whatever mesh trained them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from core.errors import first_line
from data.tokenizer import Tokenizer
from model.transformer import Transformer
from sharding.mesh import MeshConfig, make_mesh
from sharding.rules import Rules, default_rules, tree_shardings
from train.checkpoint import Checkpointer
from train.config import Config
from train.run_dir import RunDir


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

    @property
    def window(self) -> int:
        """The context every inference path uses (generation, scoring, the harness, inspection,
        perplexity): the model's own ``model.max_seq_len``, never ``train.seq_len`` (how long the
        training rows were; a fine-tune's may be far shorter than the model's context)."""
        return self.cfg.model.max_seq_len


def read_run_config(path: str | Path) -> Config:
    """The saved config of the run that ``path`` (a run directory or one of its checkpoints) belongs
    to; ValueError if it is neither or the config is invalid. Reads no parameters."""
    return RunDir.of_checkpoint(path)[0].read_config()


def load_run(path: str | Path, mesh_cfg: MeshConfig | None = None) -> LoadedRun:
    """Restores the parameters of ``path`` onto ``mesh_cfg`` (default: the run's own mesh when it
    fits the devices here, else every device on ``data``). A run directory gives its newest
    checkpoint that verifies, as training would resume it (a warning passes over damaged newer
    ones); a step directory gives that step, refused if it does not verify."""
    run, step = RunDir.of_checkpoint(path)
    cfg = run.read_config()
    tokenizer = run.load_tokenizer()
    kind = cfg.data.tokenizer.partition(":")[0]
    if kind != "run" and tokenizer.kind != kind:  # "run:DIR" names another run's tokenizer, any kind
        raise ValueError(f"the tokenizer in {run.path} is {tokenizer.kind!r} but the run was trained "
                         f"with data.tokenizer={cfg.data.tokenizer!r}: they do not belong together")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer in {run.path} has {tokenizer.vocab_size} ids but the model "
                         f"only {cfg.model.vocab_size}: they do not belong together")
    mesh, rules = make_mesh(mesh_cfg or cfg.mesh.fitting(jax.device_count())), default_rules()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0))))
    steps = run.committed_steps()
    if not steps:
        raise ValueError(f"{run.path} has no complete checkpoint")
    if step is not None and step not in steps:
        raise ValueError(f"checkpoint {step} in {run.path} is missing or incomplete "
                         f"(complete: {steps})")
    checkpointer = Checkpointer(run.path, cfg.checkpoint, read_only=True)  # the run may be live
    try:
        if step is None:
            step = checkpointer.readable_step()
        params = checkpointer.restore_params(step, abstract, tree_shardings(abstract, mesh, rules))
    except Exception as e:  # orbax raises many types for damaged files
        if step is None:  # no checkpoint verifies
            raise ValueError(first_line(e)) from None
        raise ValueError(f"cannot restore checkpoint {step} of {run.path}: {first_line(e)}") from None
    finally:
        checkpointer.close()
    return LoadedRun(cfg, tokenizer, graphdef, params, mesh, rules, step, run.path)
