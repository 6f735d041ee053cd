"""Connector alignment (LLaVA-1.5's stage 1) for an encoder front-end: only the connector trains, on
captions, against the LM loss alone; the LLM and the pretrained encoders stay frozen (LLaVA: LR 1e-3).

python train/align.py --config CONFIG.yaml --model.preset tiny-encoders --optim.lr 1e-3
deepspeed --num_gpus 8 train/align.py --config CONFIG.yaml   # with model.preset llava-1.5-7b and its paths
Then SFT from its export: python train/sft.py --config ... --model.init_path RUN/export
"""

import sys
from pathlib import Path

# Run by path (`deepspeed train/X.py`), Python puts train/ first on sys.path; the repository root
# takes its place, so that `train` imports as the package even without `pip install -e .`.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cli import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage align with the command-line arguments (or argv)."""
    return run_stage("align", argv)


if __name__ == "__main__":
    main()
