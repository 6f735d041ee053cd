"""Each reader scores a small hand-made file in its public format; metrics computed by hand."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from eve.eval import benchmarks as B


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)


def _score(name, data, preds, image_root=None):
    spec = B.get_benchmark(name)
    samples, data = B.load_samples(spec, data, image_root)
    result, _ = B.score_predictions(spec, samples, preds, data)
    return samples, result


def test_prompts_follow_design():
    short = B.EvalSample("0", "what is the shape?", ["circle"], None)
    assert B.build_question(short) == "what is the shape?\nAnswer the question using a single word or phrase."
    mc = B.EvalSample("1", "Which fruit?", ["B"], None, choices=["Apple", "Banana"], context="A bowl.")
    assert B.build_question(mc) == (
        "Context: A bowl.\nWhich fruit?\nA. Apple\nB. Banana\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_easy_vqa_reader_and_baselines(tmp_path):
    test, train = tmp_path / "test", tmp_path / "train"
    rows = [
        ["what is the shape?", "circle", 0],
        ["is there a red shape?", "yes", 0],
        ["what color is the shape?", "red", 1],
        ["is there a red shape?", "no", 1],
    ]
    test.mkdir()
    (test / "questions.json").write_text(json.dumps(rows))
    for i in (0, 1):
        _image(test / "images" / f"{i}.png")
    train.mkdir()
    train_rows = [
        ["is there a red shape?", "no", 5],
        ["is there a red shape?", "no", 6],
        ["is there a red shape?", "yes", 7],
        ["what is the shape?", "circle", 5],
        ["what color is the shape?", "blue", 6],
        ["what color is the shape?", "blue", 7],
    ]
    (train / "questions.json").write_text(json.dumps(train_rows))
    samples, r = _score("easy_vqa", test, ["Circle.", "yes", "blue", "yes"])
    assert [s.category for s in samples] == ["shape", "yes/no", "colour", "yes/no"]
    assert r["accuracy"] == pytest.approx(2 / 4) and r["n"] == 4
    assert r["per_category"]["yes/no"] == {"accuracy": 0.5, "n": 2}
    # Train majority answer: "no" (3 of 6) -> right on row 3 only.
    assert r["baselines"]["majority"]["answer"] == "no"
    assert r["baselines"]["majority"]["accuracy"] == pytest.approx(1 / 4)
    # Question-only: circle (right), no (wrong), blue (wrong), no (right).
    assert r["baselines"]["question_only"]["accuracy"] == pytest.approx(2 / 4)
    assert r["baselines"]["question_only"]["per_category"]["yes/no"]["accuracy"] == pytest.approx(1 / 2)


def test_easy_vqa_baselines_on_the_real_package():
    spec = B.get_benchmark("easy_vqa")
    samples, data = B.load_samples(spec, None)
    assert len(samples) == 9673
    base = B.easy_vqa_baselines(samples, data.parent / "train" / "questions.json")
    # Reference values of issue 5, to 0.1 pt (they are rounded to 0.1 pt).
    assert base["majority"]["accuracy"] == pytest.approx(0.373, abs=1e-3)
    assert base["question_only"]["accuracy"] == pytest.approx(0.670, abs=1e-3)
    assert base["question_only"]["per_category"]["yes/no"]["accuracy"] == pytest.approx(0.825, abs=1e-3)


def test_pope_reader_and_metrics(tmp_path):
    rows = [
        ("yes", "Yes"),
        ("no", "Yes, there is."),
        ("yes", "yes"),
        ("yes", "No, there is not."),
        ("no", "There is a cat."),  # no "no"/"not": read as yes (LLaVA's rule)
        ("no", "no"),
    ]
    lines = [
        json.dumps(
            {"question_id": i + 1, "image": f"COCO_val2014_{i}.jpg", "text": "Is there a cat?", "label": lab}
        )
        for i, (lab, _) in enumerate(rows)
    ]
    (tmp_path / "pope").mkdir()
    (tmp_path / "pope" / "coco_pope_random.json").write_text("\n".join(lines[:4]) + "\n")
    (tmp_path / "pope" / "coco_pope_adversarial.json").write_text("\n".join(lines[4:]) + "\n")
    for i in range(6):
        _image(tmp_path / "val2014" / f"COCO_val2014_{i}.jpg")
    preds = [p for _, p in rows[4:] + rows[:4]]  # files are read in name order: adversarial first
    samples, r = _score("pope", tmp_path / "pope", preds, image_root=tmp_path / "val2014")
    assert [s.category for s in samples] == ["adversarial"] * 2 + ["random"] * 4
    # Parsed: adv [yes, no] vs [no, no]; random [yes, yes, yes, no] vs [yes, no, yes, yes].
    # TP = 2, FP = 2, TN = 1, FN = 1.
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 2, 1, 1)
    assert r["accuracy"] == pytest.approx(3 / 6)
    assert r["precision"] == pytest.approx(2 / 4)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 7)
    assert r["yes_ratio"] == pytest.approx(4 / 6)
    assert r["per_category"]["adversarial"]["accuracy"] == pytest.approx(1 / 2)
    assert r["per_category"]["random"]["recall"] == pytest.approx(2 / 3)


def test_pope_without_labels_names_the_fix(tmp_path):
    f = tmp_path / "llava_pope_test.jsonl"
    f.write_text(json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a cat?"}) + "\n")
    with pytest.raises(ValueError, match="coco_pope_random.json"):
        B.read_pope(f)


def test_mmvp_reader_and_pair_rule(tmp_path):
    root = tmp_path / "MMVP"
    root.mkdir()
    with (root / "Questions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Index", "Question", "Options", "Correct Answer"])
        w.writerow([1, "Are the wings open or closed?", "(a) Open (b) Closed", "(a)"])
        w.writerow([2, "Are the wings open or closed?", "(a) Open (b) Closed", "(b)"])
        w.writerow([3, "Is the dog facing left or right?", "(a) Left (b) Right", "(b)"])
        w.writerow([4, "Is the dog facing left or right?", "(a) Left (b) Right", "(a)"])
        w.writerow([5, "Is there a hat?", "(a) Yes (b) No", "(a)"])
        w.writerow([6, "Is there a hat?", "(a) Yes (b) No", "(b)"])
    for i in range(1, 7):
        _image(root / "MMVP Images" / f"{i}.jpg")
    # Pair 1 right ("(a) Open", "Closed"), pair 2 one wrong, pair 3 right ("a", "(b)").
    preds = ["(a) Open", "Closed", "(b) Right", "(b) Right", "a", "(b)"]
    samples, r = _score("mmvp", root, preds)
    assert samples[0].choices == ["Open", "Closed"] and samples[0].answers == ["A"]
    assert [s.meta["pair"] for s in samples] == ["0", "0", "1", "1", "2", "2"]
    assert r["accuracy"] == pytest.approx(2 / 3)  # pair accuracy is MMVP's headline
    assert r["question_accuracy"] == pytest.approx(5 / 6)
    assert r["n_pairs"] == 3 and r["n"] == 6


def test_cv_bench_reader_per_task_and_combined(tmp_path):
    root = tmp_path / "CV-Bench"
    rows = [  # (task, type, source, choices, answer, prediction, right?)
        ("Count", "2D", "ADE20K", ["3", "2", "1", "0"], "(C)", "1", True),
        ("Count", "2D", "COCO", ["3", "2", "1", "0"], "(A)", "(B)", False),
        ("Relation", "2D", "ADE20K", ["left", "right"], "(B)", "B", True),
        ("Relation", "2D", "COCO", ["above", "below"], "(A)", "above", True),
        ("Depth", "3D", "Omni3D", ["lamp", "chair"], "(A)", "(A) lamp", True),
        ("Depth", "3D", "Omni3D", ["lamp", "chair"], "(B)", "lamp", False),
        ("Distance", "3D", "Omni3D", ["sofa", "table"], "(B)", "The answer is (B)", True),
        ("Distance", "3D", "Omni3D", ["sofa", "table"], "(A)", "C", False),
    ]
    lines = []
    for i, (task, typ, src, choices, ans, _, _) in enumerate(rows):
        fname = f"img/{typ}/{task.lower()}/{src.lower()}_{i}.png"
        _image(root / fname)
        lines.append(
            json.dumps(
                {
                    "idx": i,
                    "type": typ,
                    "task": task,
                    "question": "Which?",
                    "choices": choices,
                    "answer": ans,
                    "prompt": "unused",
                    "filename": fname,
                    "source": src,
                }
            )
        )
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    _, r = _score("cv_bench", root, [row[5] for row in rows])
    assert {k: v["accuracy"] for k, v in r["per_category"].items()} == {
        "Count": 0.5,
        "Relation": 1.0,
        "Depth": 0.5,
        "Distance": 0.5,
    }
    # ADE20K 2/2, COCO 1/2 -> 2D 0.75; Omni3D 2/4 -> 3D 0.5; combined 0.625; plain mean 5/8.
    assert r["accuracy_2d"] == pytest.approx(0.75)
    assert r["accuracy_3d"] == pytest.approx(0.5)
    assert r["accuracy"] == pytest.approx(0.625)
    assert r["question_accuracy"] == pytest.approx(5 / 8)


def test_scienceqa_img_reader(tmp_path):
    root = tmp_path / "scienceqa"
    problems = {
        "1": {
            "question": "Which is a mammal?",
            "choices": ["frog", "whale"],
            "answer": 1,
            "hint": "",
            "image": "image.png",
            "split": "test",
            "subject": "natural science",
        },
        "2": {
            "question": "Which state is farthest north?",
            "choices": ["Ohio", "Maine", "Texas"],
            "answer": 1,
            "hint": "Look at the map.",
            "image": "image.png",
            "split": "test",
            "subject": "social science",
        },
        "3": {
            "question": "No image here",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": None,
            "split": "test",
            "subject": "language science",
        },
        "4": {
            "question": "Train question",
            "choices": ["a", "b"],
            "answer": 0,
            "hint": "",
            "image": "image.png",
            "split": "train",
            "subject": "natural science",
        },
    }
    root.mkdir()
    (root / "problems.json").write_text(json.dumps(problems))
    _image(root / "images" / "test" / "1" / "image.png")
    _image(root / "images" / "test" / "2" / "image.png")
    samples, r = _score("scienceqa_img", root, ["B", "Ohio"])
    assert [s.id for s in samples] == ["1", "2"]
    assert samples[1].answers == ["B"] and samples[1].context == "Look at the map."
    assert "C. Texas" in B.build_question(samples[1])
    assert r["accuracy"] == 0.5
    assert r["per_category"] == {
        "natural science": {"accuracy": 1.0, "n": 1},
        "social science": {"accuracy": 0.0, "n": 1},
    }


def test_vqa_jsonl_soft_and_exact(tmp_path):
    ten = ["coca cola"] * 2 + ["coke"] * 8
    rows = [
        {
            "question_id": 1,
            "image": "a.jpg",
            "question": "What brand?",
            "answers": ten,
            "category": "textvqa",
        },
        {"question_id": 2, "image": "b.jpg", "text": "Which side?", "answer": "left", "category": "gqa"},
        {"question_id": 3, "image": "b.jpg", "question": "How many?", "answers": [{"answer": "2"}]},
    ]
    (tmp_path / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _image(tmp_path / "images" / "a.jpg")
    _image(tmp_path / "images" / "b.jpg")
    # "Coca-Cola": 2 of 10 humans -> 0.6; "Left." exact -> 1; "two" == "2" -> 1.
    _, r = _score("vqa", tmp_path / "questions.jsonl", ["Coca Cola", "Left.", "two"])
    assert r["accuracy"] == pytest.approx((0.6 + 1 + 1) / 3)
    assert r["per_category"]["textvqa"]["accuracy"] == pytest.approx(0.6)


def test_textvqa_official_json(tmp_path):
    data = {
        "dataset_name": "textvqa",
        "data": [
            {"question_id": 7, "question": "What is written?", "image_id": "abc", "answers": ["stop"] * 10}
        ],
    }
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    _image(tmp_path / "train_images" / "abc.jpg")
    samples, r = _score("textvqa", tmp_path / "TextVQA_0.5.1_val.json", ["STOP"])
    assert samples[0].image.name == "abc.jpg" and r["accuracy"] == 1.0


def test_missing_images_are_skipped_and_counted(tmp_path, caplog):
    rows = [["q?", "yes", 0], ["q?", "no", 1]]
    (tmp_path / "questions.json").write_text(json.dumps(rows))
    _image(tmp_path / "images" / "0.png")
    samples = B.read_easy_vqa(tmp_path)
    assert len(samples) == 1
    assert "1 of 2 samples skipped" in caplog.text and "--image-root" in caplog.text


def test_unknown_benchmark_lists_known():
    with pytest.raises(ValueError, match="easy_vqa"):
        B.get_benchmark("nope")


def test_prompt_without_answer_instruction():
    mc = B.EvalSample("1", "Which fruit?", ["B"], None, choices=["Apple", "Banana"])
    assert B.build_question(mc, answer_instruction=False) == "Which fruit?\nA. Apple\nB. Banana"
