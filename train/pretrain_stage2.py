"""Stage 2, generative pre-training: everything but the teacher trains, from stage 1's export.

make pretrain-stage2                      # the tiny CPU default (configs/tiny/stage2.yaml)
python train/pretrain_stage2.py --config configs/tiny/stage2.yaml --optim.lr 1e-4 --train.output_dir runs/lr1e-4
python train/pretrain_stage2.py --config configs/tiny/stage2.yaml --resume   # continue its run
python -m train.pretrain_stage2 --config configs/tiny/stage2.yaml   # the same, as a module
torchrun --nproc-per-node 2 train/pretrain_stage2.py --config ... --train.deepspeed configs/deepspeed/zero3.json
deepspeed --num_gpus 8 train/pretrain_stage2.py --config configs/eve7b/stage2.yaml
"""

import sys
from pathlib import Path

# Run by path (`deepspeed train/X.py`), Python puts train/ first on sys.path; the repository root
# takes its place, so that `train` imports as the package even without `pip install -e .`.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cli import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage stage2 with the command-line arguments (or argv)."""
    return run_stage("stage2", argv)


if __name__ == "__main__":
    main()
