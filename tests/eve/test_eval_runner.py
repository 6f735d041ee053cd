"""The eval runner end to end on tiny EVE checkpoints and real easy-vqa images, against one-by-one
`model.generate` and accuracies counted by hand from the benchmark's own questions file."""

import copy
import json
from collections import Counter

from eve.assets import easy_vqa_dir
from eve.eval import runner
from eve.image_processing_eve import load_image
from eve.templates import VICUNA_SYSTEM
from tests.conftest import direct_answer, force_reply

SHORT = "Answer the question using a single word or phrase."


def easy_vqa_rows(n: int) -> list[tuple[str, str, str]]:
    """(question, answer, image path) of the first `n` test questions, read straight from the file."""
    rows = json.loads((easy_vqa_dir("test") / "questions.json").read_text())[:n]
    return [(q, a, str(easy_vqa_dir("test") / "images" / f"{i}.png")) for q, a, i in rows]


def read_predictions(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_easy_vqa_end_to_end_writes_json(tiny_checkpoint, loaded, tmp_path, capsys):
    """CLI run (batches of 5, length-sorted): each prediction is the one-by-one greedy answer."""
    out = tmp_path / "eval"
    argv = ["--model", str(tiny_checkpoint), "--benchmark", "easy_vqa", "--out", str(out), "--device", "cpu"]
    assert runner.main(argv + ["--limit", "12", "--batch-size", "5", "--max-new-tokens", "3", "--quiet"]) == 0
    result = json.loads((out / "easy_vqa.json").read_text())
    preds = read_predictions(out / "easy_vqa_predictions.jsonl")
    rows = easy_vqa_rows(12)
    assert [(p["question"], p["answers"], p["image"]) for p in preds] == [(q, [a], im) for q, a, im in rows]

    model, processor = loaded
    for p, (question, _, image) in zip(preds, rows):
        prompt = f"{VICUNA_SYSTEM} USER: <image>\n{question}\n{SHORT} ASSISTANT:"
        assert p["prediction"] == direct_answer(model, processor, prompt, load_image(image), 3), p["id"]

    # Accuracy and its per-category split, recounted from the file: exact match after lower-casing
    # is easy-vqa's metric for these one-word answers, and the answer decides the category.
    correct = [p["prediction"].strip(" .").lower() == a for p, (_, a, _) in zip(preds, rows)]
    assert [p["score"] for p in preds] == [float(c) for c in correct]
    assert result["n"] == 12 and result["accuracy"] == sum(correct) / 12
    assert result["per_category"]["yes/no"]["n"] == sum(a in ("yes", "no") for _, a, _ in rows)
    assert sum(c["n"] for c in result["per_category"].values()) == 12
    assert set(result["baselines"]) == {"majority", "question_only"}
    table = capsys.readouterr().out
    assert "overall (12)" in table and "question-only" in table


def test_accuracy_of_a_model_that_always_says_no(loaded, tmp_path, tokenizer):
    """A model rigged to answer "no": accuracy and per-category accuracy equal the share of "no" answers."""
    model, processor = loaded
    [no] = tokenizer("no", add_special_tokens=False)["input_ids"]
    rigged = force_reply(copy.deepcopy(model), no, tokenizer.eos_token_id)
    result = runner.evaluate(
        "rigged",
        "easy_vqa",
        tmp_path,
        limit=12,
        batch_size=5,
        max_new_tokens=4,  # room after the eos: the answer must stop there
        model_and_processor=(rigged, processor),
        progress=False,
    )
    preds = read_predictions(tmp_path / "easy_vqa_predictions.jsonl")
    assert [p["prediction"] for p in preds] == ["no"] * 12
    answers = [a for _, a, _ in easy_vqa_rows(12)]
    assert 0 < answers.count("no") < 12  # the check below can tell right from wrong
    assert result["accuracy"] == answers.count("no") / 12
    category = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}
    by_category = Counter(category.get(a, "colour") for a in answers)
    for name, n in by_category.items():
        right = sum(a == "no" for a in answers if category.get(a, "colour") == name)
        assert result["per_category"][name] == {"accuracy": right / n, "n": n}, name


def test_batched_equals_one_by_one(loaded):
    """Left padding and length sorting must not change greedy answers (invariant, not a tolerance)."""
    from eve.eval.benchmarks import get_benchmark, load_samples

    samples, _ = load_samples(get_benchmark("easy_vqa"), None)
    samples = samples[:6]
    model, processor = loaded
    batched = runner.predict(model, processor, samples, batch_size=6, max_new_tokens=4, progress=False)
    single = runner.predict(model, processor, samples, batch_size=1, max_new_tokens=4, progress=False)
    assert batched == single


def test_unreadable_image_is_scored_wrong_not_fatal(loaded, tmp_path):
    """A missing image costs its question (empty prediction, score 0); the other answers are unchanged."""
    from eve.eval.benchmarks import get_benchmark, load_samples

    samples, _ = load_samples(get_benchmark("easy_vqa"), None)
    samples = copy.deepcopy(samples[:4])
    model, processor = loaded
    want = runner.predict(model, processor, samples, batch_size=4, max_new_tokens=3, progress=False)
    samples[1].image = tmp_path / "missing.png"
    got = runner.predict(model, processor, samples, batch_size=4, max_new_tokens=3, progress=False)
    assert got == [want[0], "", want[2], want[3]]


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
