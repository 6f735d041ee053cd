"""`python -m train.compare --config YAML`: variants as lists of shipped stage configs, each stage from the
previous export, on data given once; run here with the tiny configs, one step per stage."""

import json

import pytest
import yaml

from tests.train.synthetic import TINY_MODEL, write_llava_json, write_shards
from train.compare import main
from train.compare_configs import load_compare_config, variant_steps

TINY = ["--model.overrides", json.dumps(TINY_MODEL), "--train.max_steps", "1"]
TINY += ["--train.global_batch_size", "2", "--train.micro_batch_size", "2", "--data.max_length", "256"]


def compare_yaml(tmp_path, **changes) -> str:
    shards = write_shards(tmp_path / "shards", n_samples=8, per_shard=8)
    sft = write_llava_json(tmp_path / "sft", n_samples=6)
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": shards, "sft_json": str(sft), "sft_image_root": str(tmp_path / "sft")},
        "evaluation": [{"benchmark": "easy_vqa", "args": ["--limit", "4", "--device", "cpu"]}],
        "variants": {
            "eve": {
                "stages": [
                    {"name": "stage1", "script": "pretrain_stage1.py", "config": "configs/tiny/stage1.yaml",
                     "data": "shards", "args": ["--teachers", "[]"]},
                    {"name": "sft", "script": "sft.py", "config": "configs/tiny/sft.yaml", "data": "sft",
                     "args": ["--teachers", "[]", "--optim.frozen_llm_layers", "0"]},
                ],
                "args": TINY,
            }
        },
    }  # fmt: skip
    tree.update(changes)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_the_7b_compare_config_chains_the_shipped_stage_configs():
    config = load_compare_config("configs/compare/7b.yaml")
    assert [v.name for v in config.variants] == ["eve", "eve2", "llava", "mof-interleaved", "comm", "sva"]
    for variant in config.variants:
        steps = variant_steps(config, variant)
        trains = steps[: len(variant.stages)]
        for prev, step in zip([None, *trains], trains):
            init = (
                step.argv[step.argv.index("--model.init_path") + 1]
                if "--model.init_path" in step.argv
                else None
            )
            assert init == (None if prev is None else str(prev.output / "export"))
            # The same data for every variant: shards for pre-training, the conversations for SFT.
            kind = "--data.json" if step.name == "sft" else "--data.shards"
            value = step.argv[step.argv.index(kind) + 1]
            assert value == (
                config.data["sft_json"] if step.name == "sft" else json.dumps(config.data["shards"])
            )
        assert [s.name for s in steps[len(variant.stages) :]] == ["eval-mmvp", "eval-pope", "eval-cv_bench"]


def test_compare_config_runs_reuses_and_tabulates(tmp_path):
    path = compare_yaml(tmp_path)
    rows = main(["--config", path])
    run = tmp_path / "run"
    assert [r["variant"] for r in rows] == ["eve"] and rows[0]["frontend"] == "pel"
    result = json.loads((run / "eve/eval/easy_vqa.json").read_text())
    assert rows[0]["easy_vqa"] == result["accuracy"] and result["n"] == 4
    # SFT started from stage 1's export and trained one step on the given conversations.
    saved = json.loads((run / "eve/sft/config.json").read_text())  # the SFT run's resolved settings
    assert saved["model"]["init_path"] == str(run / "eve/stage1/export")
    assert saved["data"]["json"] == str(tmp_path / "sft/sft.json") and saved["data"]["shards"] == []
    assert [json.loads(x)["step"] for x in (run / "eve/sft/metrics.jsonl").read_text().splitlines()] == [1]
    assert (run / "compare.md").read_text().splitlines()[2].startswith("| eve | pel |")
    before = (run / "eve/sft/metrics.jsonl").stat().st_mtime_ns
    main(["--config", path])
    assert (run / "eve/sft/metrics.jsonl").stat().st_mtime_ns == before  # reused, not retrained


@pytest.mark.parametrize(
    "change, message",
    [
        ({"extra": 1}, "unknown keys"),
        ({"data": {"shards": ["x"]}}, "data.sft_json"),
        ({"variants": {"v": {"stages": [{"name": "s", "script": "nope.py", "config": "c", "data": "sft"}]}}},
         "no train/nope.py"),
        ({"variants": {"v": {"stages": [{"name": "s", "script": "sft.py", "config": "c", "data": "x"}]}}},
         "shards or sft"),
    ],
)  # fmt: skip
def test_bad_compare_configs_name_the_file_and_the_key(tmp_path, change, message):
    path = compare_yaml(tmp_path, **change)
    with pytest.raises(SystemExit, match=message) as err:
        load_compare_config(path)
    assert path in str(err.value)
