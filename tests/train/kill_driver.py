"""Run one training stage and SIGKILL this process at a chosen point (for tests/train/test_rundir.py).

    python tests/train/kill_driver.py POINT CONFIG.yaml

POINT: "step" (inside the 3rd optimizer step), "checkpoint" (while the step-4 checkpoint is being
written: after its model state, before its scheduler state) or "export" (after the exported model
weights are written, before the tokenizer and the completion marker). The kill is a real SIGKILL of
the training process: nothing is flushed or cleaned up, as when a machine dies.
"""

import os
import signal
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[2])  # the repository root, not tests/train/

import torch  # noqa: E402

from eve import EveProcessor  # noqa: E402
from train import checkpointing, engine  # noqa: E402
from train.cli import run_stage  # noqa: E402


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(point: str, config: str) -> None:
    if point == "step":
        calls = {"n": 0}
        original_step = engine.Trainer.train_step

        def step(self, micro):
            calls["n"] += 1
            if calls["n"] == 3:
                die()
            return original_step(self, micro)

        engine.Trainer.train_step = step
    elif point == "checkpoint":
        original_save = torch.save

        def save(obj, path, *args, **kwargs):
            if str(path).endswith("scheduler.pt") and ".tmp-step-0000004" in str(path):
                die()
            return original_save(obj, path, *args, **kwargs)

        checkpointing.torch.save = save
    elif point == "export":
        EveProcessor.save_pretrained = lambda self, *args, **kwargs: die()
    else:
        raise SystemExit(f"unknown kill point {point!r}")
    run_stage("stage1", ["--config", config])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
