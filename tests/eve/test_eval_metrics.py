"""Lenient matching and benchmark metrics against hand-computed values."""

import pytest

from eve.eval import metrics


@pytest.mark.parametrize(
    "pred, ref",
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("(a) Apple", "Apple"),
        ("the apple", "apple"),
        ("An Apple!", "apple"),
        ("Two", "2"),
        ("twelve", "12"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("  Red  ", "red"),
    ],
)
def test_short_answer_match_is_lenient(pred, ref):
    assert metrics.short_answer_match(pred, ref)


@pytest.mark.parametrize("pred, ref", [("no", "yes"), ("3", "35"), ("red circle", "red"), ("2", "3.5")])
def test_short_answer_mismatch(pred, ref):
    assert not metrics.short_answer_match(pred, ref)


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("A", "A"),
        ("a", "A"),
        ("(a)", "A"),
        ("(a) Apple", "A"),
        ("B.", "B"),
        ("b) Banana", "B"),
        ("Apple", "A"),
        ("the banana", "B"),
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("I think it is a cherry", "C"),
        ("D", None),  # only three options
        ("durian", None),
        ("", None),
    ],
)
def test_extract_choice(pred, letter):
    assert metrics.extract_choice(pred, ["Apple", "Banana", "Cherry"]) == letter


def test_extract_choice_numbers():
    # CV-Bench count options are numbers; number words map to digits.
    assert metrics.extract_choice("two", ["3", "2", "1", "0"]) == "B"
    assert metrics.extract_choice("0", ["3", "2", "1", "0"]) == "D"


@pytest.mark.parametrize("ref, letter", [("(A)", "A"), ("(c)", "C"), ("B", "B"), ("d.", "D")])
def test_letter_of(ref, letter):
    assert metrics.letter_of(ref) == letter


def test_letter_of_rejects_text():
    with pytest.raises(ValueError, match="option letter"):
        metrics.letter_of("Apple")


@pytest.mark.parametrize(
    "pred, parsed",
    [
        ("Yes", "yes"),
        ("yes, there is a dog.", "yes"),
        ("No.", "no"),
        ("There is not a dog.", "no"),
        ("dog", "yes"),
    ],
)
def test_parse_yes_no(pred, parsed):
    assert metrics.parse_yes_no(pred) == parsed


def test_yes_no_metrics_by_hand():
    preds = ["yes", "yes", "yes", "no", "yes"]
    labels = ["yes", "no", "yes", "yes", "no"]
    # TP = 2 (rows 0, 2), FP = 2 (rows 1, 4), FN = 1 (row 3), TN = 0.
    m = metrics.yes_no_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 2, 1, 0)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)  # 2 * 0.5 * (2/3) / (0.5 + 2/3)
    assert m["yes_ratio"] == pytest.approx(4 / 5)


def test_vqa_soft_accuracy_by_hand():
    refs = ["cat"] * 1 + ["dog"] * 3 + ["bird"] * 4 + ["fish"] * 2
    # Leave-one-out over 10 humans: m matching answers -> mean(min(1, m_i / 3)).
    assert metrics.vqa_soft_accuracy("cat", refs) == pytest.approx(0.3)  # 9 x 1/3 + 1 x 0, / 10
    assert metrics.vqa_soft_accuracy("fish", refs) == pytest.approx(0.6)
    assert metrics.vqa_soft_accuracy("Dog.", refs) == pytest.approx(0.9)  # 7 x 1 + 3 x 2/3, / 10
    assert metrics.vqa_soft_accuracy("a bird", refs) == pytest.approx(1.0)
    assert metrics.vqa_soft_accuracy("horse", refs) == 0.0
    # Fewer than three references: exact match against any.
    assert metrics.vqa_soft_accuracy("Left.", ["left"]) == 1.0
    assert metrics.vqa_soft_accuracy("right", ["left"]) == 0.0


def test_accuracy_by_category():
    r = metrics.accuracy_by_category([1, 0, 1, 1], ["x", "x", "y", "y"])
    assert r == {
        "accuracy": 0.75,
        "n": 4,
        "per_category": {"x": {"accuracy": 0.5, "n": 2}, "y": {"accuracy": 1.0, "n": 2}},
    }


def test_pair_accuracy_needs_both():
    # Pair 0 both right, pair 1 one wrong, pair 2 both wrong.
    r = metrics.pair_accuracy([True, True, True, False, False, False], ["0", "0", "1", "1", "2", "2"])
    assert r["pair_accuracy"] == pytest.approx(1 / 3)
    assert r["question_accuracy"] == pytest.approx(3 / 6)
    assert r["n_pairs"] == 3


def test_cv_bench_combined_by_hand():
    correct = [True, False, True, True, False, False, False]
    sources = ["ADE20K", "ADE20K", "COCO", "Omni3D", "Omni3D", "Omni3D", "Omni3D"]
    r = metrics.cv_bench_combined(correct, sources)
    # 2D = mean(1/2, 1/1) = 0.75; 3D = 1/4; combined = mean(0.75, 0.25) = 0.5.
    assert r["accuracy_2d"] == pytest.approx(0.75)
    assert r["accuracy_3d"] == pytest.approx(0.25)
    assert r["combined_accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "pred, parsed",
    [("Yes", "yes"), ("yes, it is.", "yes"), ("No.", "no"), ("not really", "no"), ("NO", "no"),
     ("I think yes", "other"), ("Maybe", "other"), ("", "other")],
)  # fmt: skip
def test_parse_mme_yes_no(pred, parsed):
    assert metrics.parse_mme_yes_no(pred) == parsed


def test_mme_scores_by_hand():
    # existence: image e1 both right, e2 one right; color: image c1 none right.
    # Questions 3/6 = 50%, images 1/3 = 33.3%; existence 75 + 50 = 125, color 0 + 0 = 0.
    correct = [True, True, True, False, False, False]
    images = ["e1", "e1", "e2", "e2", "c1", "c1"]
    tasks = ["existence"] * 4 + ["color"] * 2
    r = metrics.mme_scores(correct, images, tasks)
    assert r["per_subtask"]["existence"] == {
        "accuracy": 0.75, "accuracy_plus": 0.5, "score": 125.0, "n": 4, "n_images": 2
    }  # fmt: skip
    assert r["per_subtask"]["color"]["score"] == 0.0
    assert r["perception_score"] == 125.0 and r["cognition_score"] == 0.0
    everything = metrics.mme_scores(correct, images, ["existence"] * 6)  # one subtask: 50% + 33.3%
    assert everything["per_subtask"]["existence"]["score"] == pytest.approx(50 + 100 / 3)


def test_circular_accuracy_needs_every_rotation():
    # Two questions x 4 rotations; q2 fails in one rotation -> 1 of 2 questions; 7 of 8 passes.
    correct = [True] * 4 + [True, False, True, True]
    r = metrics.circular_accuracy(correct, ["q1"] * 4 + ["q2"] * 4, ["a"] * 4 + ["b"] * 4)
    assert r["accuracy"] == 0.5 and r["n"] == 2 and r["pass_accuracy"] == 7 / 8
    assert r["per_category"] == {"a": {"accuracy": 1.0, "n": 1}, "b": {"accuracy": 0.0, "n": 1}}
