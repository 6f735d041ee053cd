"""Stage 3, supervised fine-tuning: everything but the teacher trains, from stage 2's export.

make sft                      # the tiny CPU default (configs/tiny/sft.yaml)
python train/sft.py --config configs/tiny/sft.yaml --optim.lr 1e-4 --train.output_dir runs/lr1e-4
python train/sft.py --config configs/tiny/sft.yaml --resume   # continue its run
python -m train.sft --config configs/tiny/sft.yaml   # the same, as a module
torchrun --nproc-per-node 2 train/sft.py --config ... --train.deepspeed configs/deepspeed/zero3.json
deepspeed --num_gpus 8 train/sft.py --config configs/eve7b/sft.yaml
"""

import sys
from pathlib import Path

# Run by path (`deepspeed train/X.py`), Python puts train/ first on sys.path; the repository root
# takes its place, so that `train` imports as the package even without `pip install -e .`.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cli import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage sft with the command-line arguments (or argv)."""
    return run_stage("sft", argv)


if __name__ == "__main__":
    main()
