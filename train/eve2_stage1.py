"""EVEv2 stage 1: the patch embedding and every layer's image copies (attention, MLP, norms) train,
the LLM's own weights stay frozen, on captions (LM loss).

python train/eve2_stage1.py --config CONFIG.yaml --model.init_path STAGE0/export
Then stages 2 and SFT with train/pretrain_stage2.py and train/sft.py (everything trains).
"""

import sys
from pathlib import Path

# Run by path (`deepspeed train/X.py`), Python puts train/ first on sys.path; the repository root
# takes its place, so that `train` imports as the package even without `pip install -e .`.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cli import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage eve2_stage1 with the command-line arguments (or argv)."""
    return run_stage("eve2_stage1", argv)


if __name__ == "__main__":
    main()
