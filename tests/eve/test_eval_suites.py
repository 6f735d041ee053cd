"""MME, MMBench and SEED-Bench: each reader scores a small hand-made file in its public layout with
metrics counted by hand, then one CLI run per benchmark on the tiny checkpoint."""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from eve.eval import benchmarks as B
from eve.eval import runner


def _png(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def _b64(fmt: str) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (30, 200, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _score(name, data, preds):
    spec = B.get_benchmark(name)
    samples, data = B.load_samples(spec, data)
    result, _ = B.score_predictions(spec, samples, preds, data)
    return samples, result


def make_mme(root: Path) -> Path:
    """Two subtasks in the two official layouts: artwork (images/ + questions_answers_YN/, 2 images)
    and code_reasoning (questions beside a .png, 1 image); each image a Yes then a No question."""
    for name in ("a", "b"):
        _png(root / "artwork" / "images" / f"{name}.jpg")
        qa = root / "artwork" / "questions_answers_YN" / f"{name}.txt"
        qa.parent.mkdir(parents=True, exist_ok=True)
        qa.write_text(f"Is {name} by Monet? Please answer yes or no.\tYes\nIs it a photo?\tNo\n")
    _png(root / "code_reasoning" / "c.png")
    (root / "code_reasoning" / "c.txt").write_text("Does it print 3?\tYes\nDoes it loop forever?\tNo\n")
    return root


def test_mme_reader_and_scores(tmp_path):
    samples, r = _score(
        "mme",
        make_mme(tmp_path / "MME"),
        # artwork a: yes, no (both right); b: "Maybe" is "other" (wrong), no (right);
        # code_reasoning c: yes (right), "I think no" is "other" under MME's 4-character rule (wrong).
        ["Yes.", "no", "Maybe", "No", "yes", "I think no"],
    )
    assert [s.id for s in samples] == [
        "artwork/a/0", "artwork/a/1", "artwork/b/0", "artwork/b/1", "code_reasoning/c/0", "code_reasoning/c/1"
    ]  # fmt: skip
    assert samples[0].question == "Is a by Monet? Please answer yes or no." and samples[0].answers == ["yes"]
    assert samples[4].image.name == "c.png"
    # artwork: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; code_reasoning: acc 1/2 = 50, acc+ 0 -> 50.
    art, code = r["per_category"]["artwork"], r["per_category"]["code_reasoning"]
    assert (art["accuracy"], art["accuracy_plus"], art["n_images"]) == (0.75, 0.5, 2)
    assert art["score"] == pytest.approx(125.0) and code["score"] == pytest.approx(50.0)
    assert r["perception_score"] == pytest.approx(125.0) and r["cognition_score"] == pytest.approx(50.0)
    assert r["total_score"] == pytest.approx(175.0)
    assert r["accuracy"] == pytest.approx(4 / 6) and r["n"] == 6


def test_mme_without_subtask_folders_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="MME_Benchmark_release_version"):
        B.load_samples(B.get_benchmark("mme"), tmp_path)


def make_mmbench(root: Path) -> Path:
    """Dev TSV: q1 (4 options, answer B), q2 (4 options, answer C), q3 (2 options + hint, answer A)."""
    root.mkdir(parents=True, exist_ok=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]
    rows = [
        [1, "Which fruit?", "nan", "Apple", "Banana", "Cherry", "Date", "B", "attribute", _b64("PNG"), "x"],
        [2, "What does it say?", "", "cat", "dog", "stop", "go", "C", "ocr", _b64("PNG"), "x"],
        [3, "Is the sign red?", "Look closely.", "yes", "no", "", "", "A", "ocr", _b64("JPEG"), "x"],
    ]
    with (root / "MMBench_DEV_EN.tsv").open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(cols)
        w.writerows(rows)
    return root / "MMBench_DEV_EN.tsv"


def test_mmbench_rotations_and_circular_accuracy(tmp_path):
    # Rotation k shows original option (i + k) % N as letter i, so an answer at index a moves to
    # letter (a - k) % N: q1 B, A, D, C; q2 C, B, A, D; q3 A, B.
    preds = [
        "B", "(A) Banana", "D.", "Banana",  # q1: right in every pass (the last by option text)
        "C", "B", "A", "A",  # q2: wrong in the last pass (the answer was D)
        "A", "B",  # q3: right in both passes
    ]  # fmt: skip
    samples, r = _score("mmbench", make_mmbench(tmp_path / "mmbench"), preds)
    assert [s.id for s in samples] == [
        "1/r0",
        "1/r1",
        "1/r2",
        "1/r3",
        "2/r0",
        "2/r1",
        "2/r2",
        "2/r3",
        "3/r0",
        "3/r1",
    ]
    assert samples[1].choices == ["Banana", "Cherry", "Date", "Apple"] and samples[1].answers == ["A"]
    assert [s.answers[0] for s in samples[4:]] == ["C", "B", "A", "D", "A", "B"]
    assert (
        samples[0].context == ""
        and samples[8].context == "Look closely."
        and samples[9].choices == ["no", "yes"]
    )
    assert {s.image.suffix for s in samples} == {".png", ".jpg"} and samples[0].image.is_file()
    # Circular: q1 and q3 right, q2 not -> 2/3; attribute 1/1, ocr 1/2; passes 9/10.
    assert r["accuracy"] == pytest.approx(2 / 3) and r["n"] == 3 and r["n_passes"] == 10
    assert r["per_category"] == {"attribute": {"accuracy": 1.0, "n": 1}, "ocr": {"accuracy": 0.5, "n": 2}}
    assert r["pass_accuracy"] == pytest.approx(9 / 10)


def test_mmbench_test_split_without_answers_names_the_fix(tmp_path):
    tsv = tmp_path / "MMBench_TEST_EN.tsv"
    tsv.write_text(
        "index\tquestion\tA\tB\tanswer\tcategory\timage\n1\tq?\tx\ty\t\tocr\t" + _b64("PNG") + "\n"
    )
    with pytest.raises(ValueError, match="MMBench_DEV_EN.tsv"):
        B.load_samples(B.get_benchmark("mmbench"), tsv)


def make_seed(root: Path) -> Path:
    """SEED-Bench.json: three image questions (dimensions 1, 1, 9) and one video question (skipped)."""
    for name in ("100_1.jpg", "100_2.jpg", "100_3.jpg"):
        _png(root / "SEED-Bench-image" / name)

    def q(qid, qtype, answer, data_id, data_type="image"):
        choices = {f"choice_{c}": f"{c}-{qid}" for c in "abcd"}
        return dict(question_id=qid, question=f"q{qid}?", **choices, answer=answer, question_type_id=qtype,
                    data_id=data_id, data_type=data_type)  # fmt: skip

    data = {
        "questions": [
            q("11", 1, "A", "100_1.jpg"),
            q("12", 1, "C", "100_2"),  # no extension: .jpg is tried
            q("13", 9, "D", "100_3.jpg"),
            q("14", 10, "A", "v1.mp4", "video"),
        ],
        "question_type": {"Scene Understanding": 1, "Text Understanding": 9, "Action Recognition": 10},
    }
    (root / "SEED-Bench.json").write_text(json.dumps(data))
    return root


def test_seed_bench_reader_per_dimension(tmp_path):
    samples, r = _score("seed_bench", make_seed(tmp_path / "seed"), ["A", "b", "(D) d-13"])
    assert [s.id for s in samples] == ["11", "12", "13"]
    assert samples[1].choices == ["a-12", "b-12", "c-12", "d-12"] and samples[1].answers == ["C"]
    # Scene Understanding 1/2 (q12 said B, not C), Text Understanding 1/1; overall 2/3.
    assert r["per_category"] == {
        "Scene Understanding": {"accuracy": 0.5, "n": 2},
        "Text Understanding": {"accuracy": 1.0, "n": 1},
    }
    assert r["accuracy"] == pytest.approx(2 / 3) and r["n"] == 3


@pytest.mark.parametrize(
    "name, make, keys",
    [
        ("mme", make_mme, {"perception_score", "cognition_score", "total_score"}),
        ("mmbench", make_mmbench, {"pass_accuracy", "n_passes"}),
        ("seed_bench", make_seed, set()),
    ],
)
def test_cli_end_to_end(tiny_checkpoint, tmp_path, capsys, name, make, keys):
    """The CLI on the tiny checkpoint: JSON with the benchmark's metrics, one prediction per question."""
    data, out = make(tmp_path / name), tmp_path / "eval"
    argv = ["--model", str(tiny_checkpoint), "--benchmark", name, "--data", str(data), "--out", str(out)]
    assert (
        runner.main(argv + ["--device", "cpu", "--limit", "4", "--batch-size", "4", "--max-new-tokens", "2"])
        == 0
    )
    result = json.loads((out / f"{name}.json").read_text())
    assert {"benchmark", "accuracy", "n", "per_category", "generation", "seconds"} | keys <= set(result)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["benchmark"] == name
    preds = [json.loads(line) for line in (out / f"{name}_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == result.get("n_passes", result["n"]) <= 4 and all(
        isinstance(p["prediction"], str) for p in preds
    )
    assert f"{name} (n = {result['n']})" in capsys.readouterr().out
