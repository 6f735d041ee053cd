"""A local lmms-eval task of the embedded easy-vqa test split, so that lmms-eval scores a demo export offline.

    python -m eve.integrations.lmms_tasks --out runs/lmms_tasks [--limit 500]
    lmms-eval --model eve --model_args pretrained=runs/demo/sft/export --tasks easy_vqa_local \
        --include_path runs/lmms_tasks --batch_size 16 --output_path runs/lmms_eval

Writes `easy_vqa_test.json` (image path, question with the evaluation's short-answer instruction,
answer) and the task YAML `easy_vqa_local.yaml` (generate_until, greedy, lmms-eval's own
`exact_match`: answer and target compared string for string, where `python -m eve.eval` compares
leniently) into `--out`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eve.assets import easy_vqa_dir
from eve.eval.benchmarks import SHORT_ANSWER_PROMPT

TASK = "easy_vqa_local"


def write_easy_vqa_task(out: str | Path, limit: int | None = None) -> Path:
    """The task's data and YAML in `out` (the first `limit` test questions); returns the YAML's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    test = easy_vqa_dir("test")
    questions = json.loads((test / "questions.json").read_text())[:limit]
    docs = [
        {
            "image": str(test / "images" / f"{image_id}.png"),
            "question": f"{q}\n{SHORT_ANSWER_PROMPT}",
            "answer": a,
        }
        for q, a, image_id in questions
    ]
    data = out / "easy_vqa_test.json"
    data.write_text(json.dumps(docs))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_visual": "image",  # a file path the adapter opens
        "doc_to_text": "question",
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 8, "temperature": 0, "until": ["\n"]},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    }
    path = out / f"{TASK}.yaml"
    path.write_text(json.dumps(task, indent=1))  # JSON is YAML
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lmms_tasks", help="folder for the task YAML and its data")
    parser.add_argument("--limit", type=int, default=None, help="only the first N test questions")
    args = parser.parse_args(argv)
    path = write_easy_vqa_task(args.out, args.limit)
    print(f"task {TASK}: {path} (pass --include_path {path.parent} to lmms-eval)")


if __name__ == "__main__":
    main()
