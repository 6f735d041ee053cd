"""Answer normalisation, lenient matching and the metrics of each benchmark (pure Python).

Matching rules (docs/evaluation.md; answers are matched leniently):
- short answers: lower case, punctuation dropped, articles ("a", "an", "the") dropped, number words
  up to twenty written as digits, whitespace collapsed; so "Yes." == "yes", "Two" == "2",
  "(a) Apple" == "apple" == "the apple".
- multiple choice: the option letter is read from "A", "a", "(a)", "(A) Apple", "B.", "C:", "D)",
  "The answer is (B)", or, failing that, from an answer that names exactly one option's text.
- yes/no (POPE): the rule of the LLaVA POPE evaluator: "no" when the first sentence contains the
  word "no" or "not", "yes" otherwise.
- yes/no (MME): the rule of MME's official `eval_tool/calculation.py`: after lower-casing, "yes" when
  the first four characters contain "yes", else "no" when they contain "no", else "other" (wrong).
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    word: str(i)
    for i, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
LETTERS = string.ascii_uppercase
MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
# Punctuation becomes a space, except "." and "," between digits ("3.5", "1,000").
_PUNCT = re.compile(r"(?<!\d)[.,](?!\d)|[!\"#$%&'()*+\-/:;<=>?@\[\\\]^_`{|}~]")
# A leading option marker: "(a)", "a)", "a.", "a:" followed by text or the end.
_OPTION_PREFIX = re.compile(r"^\s*(?:\(([A-Za-z])\)|([A-Za-z])[.):])(?:\s+|$)")
# The same marker in front of an answer's text ("(a) Apple"), dropped before comparing texts.
_OPTION_PREFIX_BEFORE_TEXT = re.compile(r"^\s*(?:\([A-Za-z]\)|[A-Za-z][.):])\s+(?=\S)")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, write number words as digits, collapse spaces."""
    text = text.strip().lower()
    text = _OPTION_PREFIX_BEFORE_TEXT.sub("", text, count=1)
    text = _PUNCT.sub(" ", text).replace(",", "")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def short_answer_match(prediction: str, answers: str | Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised reference answer."""
    refs = [answers] if isinstance(answers, str) else answers
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in refs)


def extract_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter ("A", "B", ...) a free-form answer picks among `choices`, or None."""
    valid = LETTERS[: len(choices)]
    text = prediction.strip()
    # "A", "a", "(b)", "C." and "(a) Apple" / "a. Apple": a letter in front.
    if len(text) == 1 and text.upper() in valid:
        return text.upper()
    m = _OPTION_PREFIX.match(text)
    if m and (m.group(1) or m.group(2)).upper() in valid:
        return (m.group(1) or m.group(2)).upper()
    # The answer names one option's text ("Apple", "the apple").
    norm = normalize_answer(text)
    named = [LETTERS[i] for i, c in enumerate(choices) if normalize_answer(c) == norm]
    if len(named) == 1:
        return named[0]
    # "The answer is (B)" / "Answer: B": a parenthesised or trailing letter somewhere.
    m = re.search(r"\(([A-Za-z])\)", text) or re.search(r"answer(?: is)?:?\s+([A-Za-z])\b", text, re.I)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    # The answer contains exactly one option's text ("it is an apple").
    contained = [
        LETTERS[i]
        for i, c in enumerate(choices)
        if normalize_answer(c) and re.search(rf"\b{re.escape(normalize_answer(c))}\b", norm)
    ]
    return contained[0] if len(contained) == 1 else None


def letter_of(answer: str) -> str:
    """The upper-case option letter of a reference answer such as "(A)", "(a)", "A" or "a."."""
    m = re.fullmatch(r"\s*\(?([A-Za-z])\)?\.?\s*", answer)
    if not m:
        raise ValueError(f"reference answer {answer!r} is not an option letter like '(A)' or 'A'")
    return m.group(1).upper()


def parse_yes_no(prediction: str) -> str:
    """'yes' or 'no' for a free-form answer (LLaVA's POPE rule: 'no'/'not' in the first sentence)."""
    first = prediction.strip().split(".")[0]
    words = normalize_answer(first).split()
    return "no" if ("no" in words or "not" in words) else "yes"


def vqa_soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA/TextVQA accuracy: min(#matching humans / 3, 1), averaged over the 10 leave-one-out subsets.

    With 10 reference answers and m of them matching this gives 0, 0.3, 0.6, 0.9, 1, 1, ... for
    m = 0, 1, 2, 3, 4, 5, ...: the official VQA v2 / TextVQA evaluator. With fewer than three
    references (GQA, a single answer) it is exact match against any of them.
    """
    pred = normalize_answer(prediction)
    refs = [normalize_answer(a) for a in answers]
    if len(refs) < 3:
        return float(pred in refs)
    scores = []
    for i in range(len(refs)):
        matches = sum(r == pred for j, r in enumerate(refs) if j != i)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def accuracy_by_category(scores: Iterable[float], categories: Iterable[str]) -> dict:
    """{"accuracy", "n", "per_category": {cat: {"accuracy", "n"}}} of per-sample scores in [0, 1]."""
    total, n = 0.0, 0
    per: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for score, cat in zip(scores, categories, strict=True):
        total += score
        n += 1
        per[cat][0] += score
        per[cat][1] += 1
    return {
        "accuracy": total / n if n else 0.0,
        "n": n,
        "per_category": {c: {"accuracy": s / k, "n": k} for c, (s, k) in sorted(per.items())},
    }


def yes_no_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with 'yes' as the positive class: accuracy, precision, recall, F1, yes-ratio."""
    tp = fp = tn = fn = 0
    for pred, label in zip(predictions, labels, strict=True):
        if label not in ("yes", "no") or pred not in ("yes", "no"):
            raise ValueError(f"yes/no metrics need 'yes'/'no' values, got pred={pred!r} label={label!r}")
        if pred == "yes":
            tp, fp = (tp + 1, fp) if label == "yes" else (tp, fp + 1)
        else:
            tn, fn = (tn + 1, fn) if label == "no" else (tn, fn + 1)
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def pair_accuracy(correct: Sequence[bool], pair_ids: Sequence[str]) -> dict:
    """MMVP: a pair of questions scores only when every question in it is right."""
    pairs: dict[str, list[bool]] = defaultdict(list)
    for ok, pid in zip(correct, pair_ids, strict=True):
        pairs[pid].append(bool(ok))
    n_pairs = len(pairs)
    return {
        "pair_accuracy": sum(all(v) for v in pairs.values()) / n_pairs if n_pairs else 0.0,
        "n_pairs": n_pairs,
        "question_accuracy": sum(map(bool, correct)) / len(correct) if correct else 0.0,
    }


def cv_bench_combined(correct: Sequence[bool], sources: Sequence[str]) -> dict:
    """CV-Bench's overall score: mean(2D, 3D) with 2D = mean(ADE20K acc, COCO acc), 3D = Omni3D acc."""
    by_source: dict[str, list[bool]] = defaultdict(list)
    for ok, src in zip(correct, sources, strict=True):
        by_source[src].append(bool(ok))
    acc = {s: sum(v) / len(v) for s, v in by_source.items()}
    parts_2d = [acc[s] for s in ("ADE20K", "COCO") if s in acc]
    acc_2d = sum(parts_2d) / len(parts_2d) if parts_2d else None
    acc_3d = acc.get("Omni3D")
    parts = [a for a in (acc_2d, acc_3d) if a is not None]
    return {
        "accuracy_2d_ade20k": acc.get("ADE20K"),
        "accuracy_2d_coco": acc.get("COCO"),
        "accuracy_2d": acc_2d,
        "accuracy_3d": acc_3d,
        "combined_accuracy": sum(parts) / len(parts) if parts else 0.0,
    }


def most_common(values: Iterable[str]) -> str:
    """The most frequent value (the first seen wins a tie)."""
    return Counter(values).most_common(1)[0][0]


def parse_mme_yes_no(prediction: str) -> str:
    """'yes', 'no' or 'other' for a free-form answer, as MME's official evaluator reads it."""
    head = prediction.strip().lower()[:4]  # "yes, ..." / "no." / "not ..." -> the first 4 characters decide
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(correct: Sequence[bool], image_ids: Sequence[str], subtasks: Sequence[str]) -> dict:
    """MME: per subtask accuracy (questions), accuracy+ (images with both questions right) and score.

    score = 100 * (accuracy + accuracy+), at most 200 per subtask; the perception score sums the ten
    perception subtasks (at most 2000), the cognition score the four cognition ones (at most 800).
    """
    per: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for ok, image, task in zip(correct, image_ids, subtasks, strict=True):
        per[task][image].append(bool(ok))
    out = {}
    for task, images in sorted(per.items()):
        answers = [ok for oks in images.values() for ok in oks]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(oks) for oks in images.values()) / len(images)
        out[task] = {
            "accuracy": acc,
            "accuracy_plus": acc_plus,
            "score": 100 * (acc + acc_plus),
            "n": len(answers),
            "n_images": len(images),
        }
    return {
        "per_subtask": out,
        "perception_score": sum(out[t]["score"] for t in MME_PERCEPTION if t in out),
        "cognition_score": sum(out[t]["score"] for t in MME_COGNITION if t in out),
    }


def circular_accuracy(
    correct: Sequence[bool], question_ids: Sequence[str], categories: Sequence[str]
) -> dict:
    """MMBench CircularEval: a question counts only when every pass (rotation of its options) is right."""
    passes: dict[str, list[bool]] = defaultdict(list)
    category: dict[str, str] = {}
    for ok, qid, cat in zip(correct, question_ids, categories, strict=True):
        passes[qid].append(bool(ok))
        category[qid] = cat
    qids = list(passes)
    result = accuracy_by_category([float(all(passes[q])) for q in qids], [category[q] for q in qids])
    result["pass_accuracy"] = sum(map(bool, correct)) / len(correct) if correct else 0.0
    return result
