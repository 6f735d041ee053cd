"""Stage 1, LLM-guided pre-aligning: PEL, projector and aligning layer train; the LLM is frozen.

make pretrain-stage1                      # the tiny CPU default (configs/tiny/stage1.yaml)
python train/pretrain_stage1.py --config configs/tiny/stage1.yaml --optim.lr 1e-4 --resume
torchrun --nproc-per-node 2 train/pretrain_stage1.py --config ... --train.deepspeed configs/deepspeed/zero3.json
deepspeed --num_gpus 8 train/pretrain_stage1.py --config configs/eve7b/stage1.yaml
"""

import sys
from pathlib import Path

# `python train/pretrain_stage1.py` puts train/ first on sys.path: put the repo root there instead.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.engine import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage stage1 with the command-line arguments (or argv)."""
    return run_stage("stage1", argv)


if __name__ == "__main__":
    main()
