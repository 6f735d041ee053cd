"""EVEv2 stage 0: the patch embedding alone learns to feed the frozen Qwen2 LLM, on captions (LM loss).

python train/eve2_stage0.py --config CONFIG.yaml --model.preset tiny-eve2
deepspeed --num_gpus 8 train/eve2_stage0.py --config CONFIG.yaml   # model.preset eve2-7b, model.llm_path QWEN
Then stage 1 from its export: python train/eve2_stage1.py --config ... --model.init_path RUN/export
"""

import sys
from pathlib import Path

# Run by path (`deepspeed train/X.py`), Python puts train/ first on sys.path; the repository root
# takes its place, so that `train` imports as the package even without `pip install -e .`.
if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cli import run_stage  # noqa: E402


def main(argv: list[str] | None = None):
    """Train stage eve2_stage0 with the command-line arguments (or argv)."""
    return run_stage("eve2_stage0", argv)


if __name__ == "__main__":
    main()
