"""The main job end to end, shortened: curation -> stage 1 -> stage 2 -> SFT -> evaluation JSON.

Runs the real entry points (`python -m data_curation.run`, `train/pretrain_stage1.py`, ...) as
`make demo` does, on 48 real easy-vqa images and two optimizer steps per stage.
"""

import json
import re

import pytest
from PIL import Image

from tests.e2e import SMALL_CURATION
from train.demo import main, runs_table

SMALL = [
    "--eval-limit",
    "12",
    *SMALL_CURATION,
    "--train-override",
    "train.global_batch_size=4",
    "--train-override",
    "train.micro_batch_size=4",
]


def test_demo_end_to_end_writes_an_evaluation(tmp_path):
    run = tmp_path / "demo"
    main(["--run-dir", str(run), *SMALL, "--train-override", "train.max_steps=2"])
    # Curation kept at most k * per_cluster = 40 of the 48 scanned images, listed in the manifest.
    manifest = (run / "data/curated/shards/manifest.jsonl").read_text().splitlines()
    assert 0 < len(manifest) <= 40
    # Every stage trained two steps and exported a loadable model; SFT continued stage 2's export.
    for stage in ("stage1", "stage2", "sft"):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert (run / stage / "export" / "model.safetensors").is_file()
        assert (run / stage / "export" / "aligner.safetensors").is_file()
    result = json.loads((run / "eval/easy_vqa.json").read_text())
    rows = [json.loads(x) for x in (run / "eval/easy_vqa_predictions.jsonl").read_text().splitlines()]
    # The accuracy, recomputed by hand from the predictions: easy-vqa answers are single lower-case
    # words, so a prediction is right when its words, less punctuation and articles, are the answer.
    words = [re.findall(r"[a-z0-9]+", r["prediction"].lower()) for r in rows]
    right = [
        [w for w in ws if w not in ("a", "an", "the")] == [r["answers"][0]] for ws, r in zip(words, rows)
    ]
    assert result["n"] == len(rows) == 12 and result["accuracy"] == pytest.approx(sum(right) / 12)
    # The SFT export carries the instruction its questions ended with; stage 2's (captions) none.
    sft_processor = json.loads((run / "sft/export/processor_config.json").read_text())
    assert sft_processor["answer_instruction"] == "Answer the question using a single word or phrase."
    assert "answer_instruction" not in json.loads((run / "stage2/export/processor_config.json").read_text())
    summary = json.loads((run / "demo_summary.json").read_text())
    timed = ("curate", "stage1", "stage2", "sft", "eval")
    assert list(summary["timings_s"]) == [*timed, "total"]
    assert summary["timings_s"]["total"] == pytest.approx(
        sum(summary["timings_s"][k] for k in timed), abs=0.2
    )
    # The plain-question check went through the chat entry point: 5 images x (colour, shape).
    assert summary["chat_check"]["n"] == 10 and len(summary["chat_check"]["answers"]) == 10
    assert summary["easy_vqa"]["n"] == 12 and summary["align"] is True
    # The runs table (`--table`) reads the summary: this run's accuracy, minutes and its command.
    assert f"python -m train.demo --run-dir {run}" in summary["command"] and "cores" in summary["machine"]
    row = runs_table([run]).splitlines()[2]
    assert f"| {100 * result['accuracy']:.1f}% |" in row and f"`{summary['command']}`" in row
    assert f"| {summary['timings_s']['total'] / 60:.1f} |" in row
    with Image.open(run / "loss_curves.png") as img:
        assert img.size[0] > img.size[1] > 100
    assert 'id="evaluation"' in (run / "report.html").read_text()  # the report, written last
    # A second run finds every step done and redoes nothing.
    before = (run / "sft" / "metrics.jsonl").stat().st_mtime_ns
    main(["--run-dir", str(run), "--eval-limit", "12"])
    assert (run / "sft" / "metrics.jsonl").stat().st_mtime_ns == before
    # --force deletes each step's output and trains afresh (not resuming the finished 2-step run).
    main(["--run-dir", str(run), *SMALL, "--train-override", "train.max_steps=1", "--force"])
    for stage in ("stage1", "stage2", "sft"):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1]


@pytest.mark.parametrize(
    "arch, chain",
    [
        ("eve", [("stage1", "pretrain_stage1.py", None), ("stage2", "pretrain_stage2.py", "stage1"),
                 ("sft", "sft.py", "stage2")]),
        ("eve2", [("stage0", "eve2_stage0.py", None), ("stage1", "eve2_stage1.py", "stage0"),
                  ("stage2", "pretrain_stage2.py", "stage1"), ("sft", "sft.py", "stage2")]),
    ],
)  # fmt: skip
def test_demo_pipelines_chain_each_stage_to_the_previous_export(tmp_path, arch, chain):
    from train.demo import demo_steps

    steps = demo_steps(tmp_path, True, [], arch=arch)
    assert [s.name for s in steps] == ["curate", *(name for name, _, _ in chain), "eval"]
    for step, (name, script, previous) in zip(steps[1:], chain):
        argv = step.argv
        assert argv[1].endswith(f"train/{script}")
        init = argv[argv.index("--model.init_path") + 1] if "--model.init_path" in argv else None
        assert init == (None if previous is None else str(tmp_path / previous / "export"))
        reads_sft = "--data.json" in argv
        assert reads_sft == (name == "sft") and ("--data.shards" in argv) != reads_sft
    assert steps[-1].argv[steps[-1].argv.index("--model") + 1] == str(tmp_path / "sft" / "export")
