"""`make compare` shortened: two variants (encoder-free EVE and the LLaVA connector over the embedded
encoder) on 48 curated images, two steps per stage, through the real entry points; the table's
figures are checked against the files each variant wrote."""

import json

import torch
from safetensors.torch import load_file

from tests.e2e import SMALL_CURATION
from train.compare import main

SMALL = [
    "--variants",
    "eve,llava",
    "--pretrain-steps",
    "2",
    "--sft-steps",
    "2",
    "--batch-size",
    "4",
    "--eval-limit",
    "8",
    *SMALL_CURATION,
]


def test_compare_two_variants_writes_the_table(tmp_path):
    run = tmp_path / "compare"
    rows = main(["--run-dir", str(run), *SMALL])
    assert [r["variant"] for r in rows] == ["eve", "llava"]
    eve, llava = rows
    # Image tokens: the PEL's 8 x 8 grid of a 64-px image is 1 + 8 * 9 positions; the efficientnet
    # stride-16 map of the 128-px view is 8 x 8 = 64 connector tokens.
    assert (eve["image_tokens"], llava["image_tokens"]) == (73, 64)
    # Parameters from the exported weights: everything trains in EVE; the encoder stays frozen in LLaVA.
    # (BatchNorm running statistics are buffers, not parameters.)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    for r in rows:
        state = load_file(str(run / r["variant"] / "sft" / "export" / "model.safetensors"))
        assert r["params_total"] == sum(t.numel() for k, t in state.items() if not k.endswith(buffers))
    enc = sum(
        t.numel()
        for k, t in load_file(str(run / "llava/sft/export/model.safetensors")).items()
        if ".encoders." in k and not k.endswith(buffers)
    )
    assert enc > 0 and llava["params_trained"] == llava["params_total"] - enc
    assert eve["params_trained"] == eve["params_total"]
    # The frozen encoder left SFT unchanged: its weights equal the pretrain export's.
    before = load_file(str(run / "llava/pretrain/export/model.safetensors"))
    after = load_file(str(run / "llava/sft/export/model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in after if ".encoders." in k)
    # Accuracy as in each variant's evaluation; identical schedules (same steps, data and seed).
    for r in rows:
        result = json.loads((run / r["variant"] / "eval" / "easy_vqa.json").read_text())
        assert (r["accuracy"], r["n"]) == (result["accuracy"], 8)
        steps = [
            json.loads(x)["step"]
            for x in (run / r["variant"] / "sft" / "metrics.jsonl").read_text().splitlines()
        ]
        assert steps == [1, 2]
    table = (run / "compare.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| eve |") and table[3].startswith("| llava |")
    assert (run / "compare.png").stat().st_size > 1000
    # A re-run reuses both finished variants.
    before = (run / "eve" / "sft" / "metrics.jsonl").stat().st_mtime_ns
    assert main(["--run-dir", str(run), *SMALL])[0]["accuracy"] == eve["accuracy"]
    assert (run / "eve" / "sft" / "metrics.jsonl").stat().st_mtime_ns == before
