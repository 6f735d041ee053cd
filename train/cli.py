"""The command line shared by the entry scripts: `--config X.yaml --section.key value ...`."""

from __future__ import annotations

import sys
from pathlib import Path

from eve.console import setup_logging
from train.config import config_from_argv, help_text
from train.engine import train

SCRIPTS = {
    "stage1": "pretrain_stage1.py",
    "stage2": "pretrain_stage2.py",
    "sft": "sft.py",
    "align": "align.py",
    "eve2_stage0": "eve2_stage0.py",
    "eve2_stage1": "eve2_stage1.py",
}
"""Entry script of each stage (in train/)."""


def run_stage(stage_name: str, argv: list[str] | None = None) -> Path | None:
    """Parse the command line (or argv) and train `stage_name`; returns the export directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment as well).
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if "-h" in argv or "--help" in argv:
        sys.stdout.write(
            f"usage: {SCRIPTS[stage_name]} --config FILE.yaml [--section.key VALUE ...] [--resume [auto|DIR]]\n"
        )
        sys.stdout.write(help_text() + "\n")
        return None
    config = config_from_argv(argv)
    if config.stage.name is None:
        config.stage.name = stage_name
    elif config.stage.name != stage_name:
        raise ValueError(
            f"the config is for stage {config.stage.name!r} but this script trains {stage_name!r}: "
            f"use train/{SCRIPTS[config.stage.name]} or fix stage.name"
        )
    setup_logging()
    return train(config)
