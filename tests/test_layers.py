"""The package structure holds: imports flow one way (the import-linter contracts in pyproject.toml),
imports inside functions are only for the optional heavy dependencies, and every config key has a
meaning that ``python -m train --help`` shows."""

import ast
import subprocess
import sys
from pathlib import Path

from core.options import describe
from train.config import SECTIONS

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "sharding", "model", "data", "train", "inference", "eval", "convert", "cli", "bench")
# Function-local imports are for these only, each with a comment saying why: they are optional or take
# seconds to import (tensorboardX imports torch when it is installed; wandb is an extra; datasets is
# needed by hf: sources alone). The first-party modules named here exist to wrap one of them.
HEAVY = {"torch", "transformers", "lm_eval", "matplotlib", "tensorboardX", "wandb", "datasets"}
WRAPPERS = {"bench.torch_reference": "torch", "cli.harness": "lm_eval"}


def test_imports_flow_one_way():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def _local_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, commented) of every import inside a function of the file (``from a import b``
    gives ``a.b``); commented: a comment on its line or one of the three before."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inner = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    out = []
    for node in ast.walk(tree):
        if id(node) in inner and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names]
            around = "".join(lines[max(0, node.lineno - 4):node.lineno])
            out += [(node.lineno, name, "#" in around) for name in names]
    return out


def test_function_local_imports_are_only_for_heavy_optional_dependencies():
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, module, commented in _local_imports(path):
                top = module.split(".")[0]
                reason = top if top in HEAVY else WRAPPERS.get(module, WRAPPERS.get(module.rsplit(".", 1)[0]))
                if reason is None or not commented:
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}"
                                 + ("" if reason else " (not a heavy optional dependency)")
                                 + ("" if commented else " (no comment saying why)"))
    assert not found, found


def test_every_config_key_has_a_meaning_in_the_help():
    result = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for section, cls in SECTIONS.items():
        for key, type_name, _default, meaning in describe(cls):
            assert meaning, f"{section}.{key} has no meaning"
            line = next((x for x in result.stdout.splitlines() if f" {section}.{key} " in x), "")
            assert type_name in line and meaning in line, (section, key, line)
