"""``CONFIG [section.key=value ...]``, the same for every command that takes a config: a YAML preset
(a path, or a name in configs/) and overrides, resolved like ``python -m train`` resolves them, and
the list of every config key for ``--help``, generated from the config dataclasses."""

from __future__ import annotations

import argparse

from core.options import describe
from train.config import SECTIONS, Config
from train.finetune_config import load_run_config


def add_config_arguments(parser: argparse.ArgumentParser, default: str = "configs/default.yaml") -> None:
    """``CONFIG [section.key=value ...]``: a YAML preset (a path, or a name in configs/) and
    overrides, read back by ``config_of``."""
    parser.add_argument("config", nargs="?", metavar="CONFIG",
                        help=f"YAML preset: a path, or a name in configs/ (default: {default})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the preset's keys (see the list below)")


def config_arguments(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(CONFIG or None, overrides) of arguments added by ``add_config_arguments``: a first argument
    with ``=`` in it is an override, not a preset."""
    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path:
        path, overrides = None, [path, *overrides]
    return path, overrides


def config_of(args: argparse.Namespace, *, finetune: bool = False) -> Config:
    """The run's Config from ``CONFIG [overrides]`` (resolved against ``finetune.base`` when set)."""
    return load_run_config(*config_arguments(args), finetune=finetune)


def config_keys_help() -> str:
    """Every config key with its type, default and meaning, generated from the dataclasses."""
    lines = ["config keys (section.key=value):"]
    for section, cls in SECTIONS.items():
        for key, type_name, default, meaning in describe(cls):
            shown = repr(default) if isinstance(default, str) else str(default).lower() \
                if isinstance(default, bool) else str(default)
            lines.append(f"  {section}.{key:<20} {type_name:<14} {shown:<22} {meaning}")
    return "\n".join(lines)
