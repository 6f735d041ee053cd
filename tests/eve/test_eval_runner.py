"""The eval runner end to end on a tiny random EVE checkpoint and real easy-vqa images."""

import json

import pytest

from eve.eval import runner
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny random EveForCausalLM + EveProcessor (the layout of an `export/` directory)."""
    import torch

    from eve import EveConfig, EveForCausalLM, EveProcessor

    path = tmp_path_factory.mktemp("tiny_export")
    config = EveConfig.from_preset("tiny", **TINY_OVERRIDES)
    torch.manual_seed(0)
    EveForCausalLM(config).eval().save_pretrained(path)
    EveProcessor.from_config(tokenizer, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """(model, processor) loaded once from the tiny checkpoint, on CPU in fp32."""
    return runner.load_model(tiny_checkpoint, device="cpu")


def test_easy_vqa_end_to_end_writes_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_checkpoint), "--benchmark", "easy_vqa", "--out", str(out)]
    assert runner.main(argv + ["--limit", "12", "--batch-size", "5", "--max-new-tokens", "3", "--quiet"]) == 0
    result = json.loads((out / "easy_vqa.json").read_text())
    assert result["n"] == 12 and 0.0 <= result["accuracy"] <= 1.0
    assert sum(c["n"] for c in result["per_category"].values()) == 12
    assert set(result["baselines"]) == {"majority", "question_only"}
    preds = [json.loads(line) for line in (out / "easy_vqa_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(isinstance(p["prediction"], str) for p in preds)
    # The first 12 questions are about images 0 and 1 (3-4 real 64x64 pictures at most).
    assert {p["image"].rsplit("/", 1)[-1] for p in preds} <= {"0.png", "1.png", "2.png", "3.png"}
    table = capsys.readouterr().out
    assert "overall (12)" in table and "question-only" in table


def test_batched_equals_one_by_one(loaded):
    """Left padding and length sorting must not change greedy answers (invariant, not a tolerance)."""
    from eve.eval.benchmarks import get_benchmark, load_samples

    samples, _ = load_samples(get_benchmark("easy_vqa"), None)
    samples = samples[:6]
    model, processor = loaded
    batched = runner.predict(model, processor, samples, batch_size=6, max_new_tokens=4, progress=False)
    single = runner.predict(model, processor, samples, batch_size=1, max_new_tokens=4, progress=False)
    assert batched == single


def test_missing_model_dir_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="exported checkpoint"):
        runner.load_model(tmp_path)


def test_format_table_from_result():
    result = {
        "benchmark": "pope",
        "accuracy": 0.5,
        "n": 4,
        "per_category": {"random": {"accuracy": 0.5, "n": 4}},
        "precision": 0.25,
        "f1": 0.4,
    }
    table = runner.format_table(result)
    assert "overall (4)" in table and "random (4)" in table and "precision" in table and "25.0%" in table
