"""Benchmark readers (public formats from a local path), prompts, and scoring: one table of specs.

Formats implemented (field names as the public releases spell them):
- easy_vqa: the `easy-vqa` 1.0 package layout, `{split}/questions.json` = list of
  `[question, answer, image_id]` and `{split}/images/{image_id}.png`. Categories come from the
  answer set: yes/no, shape (circle, rectangle, triangle), colour (the other 8 answers).
- pope: the official POPE files (`coco_pope_{random,popular,adversarial}.json`, one JSON object per
  line: `question_id`, `image`, `text`, `label` "yes"/"no"); a file or a folder of them. The category
  is the row's `category` or else the file's split name ("random", ...).
- mmvp: the public `MMVP/MMVP` release: `Questions.csv` (columns `Index`, `Question`, `Options` like
  "(a) Open (b) Closed", `Correct Answer` like "(a)") and `MMVP Images/{Index}.jpg`. Questions
  (1, 2), (3, 4), ... are the CLIP-blind pairs; a pair counts only when both are right.
- cv_bench: `nyu-visionx/CV-Bench` `test.jsonl` rows (`idx`, `type` 2D/3D, `task` Count/Relation/
  Depth/Distance, `question`, `choices`, `answer` "(C)", `filename` "img/2D/count/ade20k_10.png",
  `source` ADE20K/COCO/Omni3D). Overall = mean(2D, 3D), 2D = mean(ADE20K, COCO), as the CV-Bench
  paper (Cambrian-1) combines them; accuracy per task beside it.
- scienceqa_img: ScienceQA `problems.json` (`{pid: {question, choices, answer (index), hint, image,
  split, subject, ...}}`), the test split's questions that have an image, images at
  `{split}/{pid}/image.png` or `images/{split}/{pid}/image.png`; per subject.
- vqa / textvqa / gqa: short-answer jsonl rows `{question_id, image, question (or text), answers
  (list, or list of {"answer": ...}) or answer, category?}`; also the official TextVQA JSON
  (`{"data": [{question_id, question, image_id, answers}]}`, images `{image_id}.jpg`) and GQA
  question JSON (`{qid: {imageId, question, answer, types}}`, images `{imageId}.jpg`).
  Scored with VQA soft accuracy (10 answers) or exact match (fewer).
- mme, mmbench, seed_bench: the readers in `eve.eval.suites` (MME release folder, MMBench dev TSV
  asked once per rotation of its options, SEED-Bench.json image questions).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eve.eval import metrics
from eve.eval.files import EvalSample, ImageResolver, find_file, read_rows
from eve.eval.suites import read_mmbench, read_mme, read_seed_bench

logger = logging.getLogger(__name__)

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
EASY_VQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


def build_question(sample: EvalSample, answer_instruction: bool = True) -> str:
    """The user turn for a sample: question, options "A. ..." if any, and the answer instruction."""
    parts = [f"Context: {sample.context}"] if sample.context else []
    parts.append(sample.question.strip())
    if sample.choices is not None:
        parts += [f"{metrics.LETTERS[i]}. {c}" for i, c in enumerate(sample.choices)]
    if answer_instruction:
        parts.append(MULTIPLE_CHOICE_PROMPT if sample.choices is not None else SHORT_ANSWER_PROMPT)
    return "\n".join(parts)


# ----------------------------------------------------------------------------- readers


def easy_vqa_category(answer: str) -> str:
    """'yes/no', 'shape' or 'colour' from an easy-vqa answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASY_VQA_SHAPES else "colour"


def default_easy_vqa_data() -> Path:
    """The test split shipped inside the installed `easy_vqa` package."""
    from eve.assets import easy_vqa_dir

    return easy_vqa_dir("test")


def read_easy_vqa(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """easy-vqa split folder (or its questions.json): `[question, answer, image_id]` triples."""
    qfile = find_file(path, ["questions.json"], "easy-vqa questions.json")
    images = ImageResolver([image_root, qfile.parent / "images", qfile.parent])
    samples = []
    rows = json.loads(qfile.read_text())
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 3):
            raise ValueError(f"{qfile}: entry {i} is {row!r}, expected [question, answer, image_id]")
        question, answer, image_id = row
        image = images(f"{image_id}.png")
        if image is not None:
            samples.append(EvalSample(str(i), question, [answer], image, easy_vqa_category(answer)))
    images.report(qfile, len(rows))
    return samples


def read_pope(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """POPE jsonl file(s): `{question_id, image, text, label}`; a folder reads every *.json/*.jsonl."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"{path}: no POPE .json/.jsonl files; pass --data to coco_pope_random.json")
    samples = []
    for f in files:
        split = re.sub(r"^.*pope_", "", f.stem)  # coco_pope_random -> random
        images = ImageResolver([image_root, f.parent, f.parent / "images", f.parent / "val2014"])
        rows = read_rows(f)
        for row in rows:
            if "label" not in row:
                raise ValueError(
                    f"{f}: row {row.get('question_id')} has no 'label'; use the official POPE files "
                    "(coco_pope_random.json, ...) that carry 'label': 'yes'/'no'"
                )
            image = images(row["image"])
            if image is not None:
                label = str(row["label"]).strip().lower()
                cat = row.get("category", split)
                samples.append(EvalSample(f"{split}/{row['question_id']}", row["text"], [label], image, cat))
        images.report(f, len(rows))
    return samples


_MMVP_OPTION = re.compile(r"\(([a-zA-Z])\)\s*(.*?)\s*(?=\([a-zA-Z]\)|$)")


def read_mmvp(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """MMVP Questions.csv + `MMVP Images/{Index}.jpg`; pair k = questions 2k-1 and 2k."""
    qfile = find_file(path, ["Questions.csv"], "MMVP Questions.csv")
    images = ImageResolver([image_root, qfile.parent / "MMVP Images", qfile.parent / "images", qfile.parent])
    with qfile.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    samples = []
    for n, row in enumerate(rows, 1):
        row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
        # The public CSV's first header reads "lndex" in some copies; the row number is the index.
        index = int(row.get("index") or row.get("lndex") or n)
        options = _MMVP_OPTION.findall(row["options"])
        if len(options) < 2:
            raise ValueError(f"{qfile}: row {index} options {row['options']!r} are not '(a) ... (b) ...'")
        image = images(f"{index}.jpg")
        if image is not None:
            samples.append(
                EvalSample(
                    str(index),
                    row["question"],
                    [metrics.letter_of(row["correct answer"])],
                    image,
                    choices=[text for _, text in options],
                    meta={"pair": str((index - 1) // 2)},
                )
            )
    images.report(qfile, len(rows))
    return samples


def read_cv_bench(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """CV-Bench test.jsonl rows; image = `filename` (or a string `image`) under the release folder."""
    qfile = find_file(path, ["test.jsonl", "test.json"], "CV-Bench test.jsonl")
    images = ImageResolver([image_root, qfile.parent])
    rows = read_rows(qfile)
    samples = []
    for row in rows:
        rel = row.get("filename") or row.get("image")
        if not isinstance(rel, str):
            raise ValueError(f"{qfile}: row {row.get('idx')} has no image path ('filename'); use test.jsonl")
        image = images(rel)
        if image is not None:
            samples.append(
                EvalSample(
                    str(row["idx"]),
                    row["question"],
                    [metrics.letter_of(row["answer"])],
                    image,
                    category=row["task"],
                    choices=[str(c) for c in row["choices"]],
                    meta={"source": row.get("source", ""), "type": row.get("type", "")},
                )
            )
    images.report(qfile, len(rows))
    return samples


def read_scienceqa_img(path: Path, image_root: Path | None = None, split: str = "test") -> list[EvalSample]:
    """ScienceQA problems.json: the `split` questions with an image, as multiple choice."""
    qfile = find_file(path, ["problems.json"], "ScienceQA problems.json")
    root = qfile.parent
    images = ImageResolver([image_root, root, root / "images"])
    problems = json.loads(qfile.read_text())
    chosen = {pid: p for pid, p in problems.items() if p.get("split") == split and p.get("image")}
    samples = []
    for pid, p in chosen.items():
        image = images(f"{split}/{pid}/{p['image']}")
        if image is not None:
            samples.append(
                EvalSample(
                    pid,
                    p["question"],
                    [metrics.LETTERS[int(p["answer"])]],
                    image,
                    category=p.get("subject", "all"),
                    choices=list(p["choices"]),
                    context=(p.get("hint") or "").strip(),
                )
            )
    if chosen:
        images.report(qfile, len(chosen))
    return samples


def _vqa_answers(row: dict) -> list[str]:
    """Reference answers of a VQA row: `answers` (strings or {"answer": ...}) or `answer`."""
    raw = row.get("answers", row.get("answer"))
    if raw is None:
        raise ValueError(f"row {row.get('question_id')} has no 'answers' or 'answer'")
    raw = raw if isinstance(raw, list) else [raw]
    return [a["answer"] if isinstance(a, dict) else str(a) for a in raw]


def read_vqa(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """Short-answer VQA: jsonl rows, the official TextVQA JSON, or GQA's question JSON."""
    qfile = find_file(path, ["questions.jsonl", "test.jsonl", "val.jsonl"], "VQA questions .jsonl")
    text = qfile.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict) and "data" in data:  # TextVQA_0.5.1_val.json
        rows = [dict(r, image=f"{r['image_id']}.jpg") for r in data["data"]]
    elif isinstance(data, dict) and all(isinstance(v, dict) and "imageId" in v for v in data.values()):
        rows = [  # GQA {qid: {imageId, question, answer, types}}
            {
                "question_id": k,
                "image": f"{v['imageId']}.jpg",
                "question": v["question"],
                "answer": v["answer"],
                "category": v.get("types", {}).get("structural", "all"),
            }
            for k, v in data.items()
        ]
    else:
        rows = read_rows(qfile)
    roots = [image_root, qfile.parent, qfile.parent / "images", qfile.parent / "train_images"]
    images = ImageResolver(roots)
    samples = []
    for row in rows:
        image = images(row["image"]) if row.get("image") else None
        if image is None and row.get("image"):
            continue
        question = row.get("question", row.get("text"))
        try:
            answers = _vqa_answers(row)
        except ValueError as e:
            raise ValueError(f"{qfile}: {e}; each row needs 'answers' (list) or 'answer'") from e
        samples.append(
            EvalSample(str(row["question_id"]), question, answers, image, category=row.get("category", "all"))
        )
    images.report(qfile, len(rows))
    return samples


# ----------------------------------------------------------------------------- scoring


def _score_short(s: EvalSample, pred: str) -> float:
    return metrics.vqa_soft_accuracy(pred, s.answers)


def _score_yes_no(s: EvalSample, pred: str) -> float:
    return float(metrics.parse_yes_no(pred) == s.answers[0])


def _score_choice(s: EvalSample, pred: str) -> float:
    return float(metrics.extract_choice(pred, s.choices or []) == s.answers[0])


def _score_mme(s: EvalSample, pred: str) -> float:
    return float(metrics.parse_mme_yes_no(pred) == s.answers[0])


SCORERS: dict[str, Callable[[EvalSample, str], float]] = {
    "short": _score_short,
    "yes_no": _score_yes_no,
    "choice": _score_choice,
    "mme_yes_no": _score_mme,
}


def _pope_extra(samples: list[EvalSample], preds: list[str], result: dict) -> dict:
    """POPE: precision / recall / F1 / yes-ratio overall and per category (split)."""
    parsed = [metrics.parse_yes_no(p) for p in preds]
    labels = [s.answers[0] for s in samples]
    out = metrics.yes_no_metrics(parsed, labels)
    for cat in result["per_category"]:
        idx = [i for i, s in enumerate(samples) if s.category == cat]
        result["per_category"][cat] = metrics.yes_no_metrics(
            [parsed[i] for i in idx], [labels[i] for i in idx]
        )
    return out


def _mmvp_extra(samples: list[EvalSample], preds: list[str], result: dict) -> dict:
    """MMVP: the headline accuracy is the pair accuracy; question accuracy beside it."""
    correct = [_score_choice(s, p) == 1.0 for s, p in zip(samples, preds)]
    pairs = metrics.pair_accuracy(correct, [s.meta["pair"] for s in samples])
    return {"accuracy": pairs["pair_accuracy"], **pairs}


def _cv_bench_extra(samples: list[EvalSample], preds: list[str], result: dict) -> dict:
    """CV-Bench: the headline is the paper's combined 2D/3D score; the plain mean beside it."""
    correct = [_score_choice(s, p) == 1.0 for s, p in zip(samples, preds)]
    combined = metrics.cv_bench_combined(correct, [s.meta["source"] for s in samples])
    return {"accuracy": combined["combined_accuracy"], "question_accuracy": result["accuracy"], **combined}


def _mme_extra(samples: list[EvalSample], preds: list[str], result: dict) -> dict:
    """MME: accuracy, accuracy+ and score per subtask; perception (/2000) and cognition (/800) totals."""
    correct = [_score_mme(s, p) == 1.0 for s, p in zip(samples, preds)]
    scores = metrics.mme_scores(correct, [s.meta["image_id"] for s in samples], [s.category for s in samples])
    result["per_category"] = scores.pop("per_subtask")
    return {**scores, "total_score": scores["perception_score"] + scores["cognition_score"]}


def _mmbench_extra(samples: list[EvalSample], preds: list[str], result: dict) -> dict:
    """MMBench CircularEval: accuracy over questions right in every rotation; per-pass accuracy beside it."""
    correct = [_score_choice(s, p) == 1.0 for s, p in zip(samples, preds)]
    ids, cats = [s.meta["question"] for s in samples], [s.category for s in samples]
    return {"n_passes": len(samples), **metrics.circular_accuracy(correct, ids, cats)}


def easy_vqa_baselines(samples: list[EvalSample], train_questions: Path) -> dict:
    """Majority-answer and question-only (most common train answer per question) baselines."""
    train = json.loads(train_questions.read_text())
    majority = metrics.most_common(a for _, a, _ in train)
    by_question: dict[str, list[str]] = {}
    for q, a, _ in train:
        by_question.setdefault(q, []).append(a)
    q_only = {q: metrics.most_common(ans) for q, ans in by_question.items()}
    cats = [s.category for s in samples]

    def score(guess: Callable[[EvalSample], str]) -> dict:
        return metrics.accuracy_by_category([float(guess(s) == s.answers[0]) for s in samples], cats)

    return {
        "majority": {"answer": majority, **score(lambda s: majority)},
        "question_only": score(lambda s: q_only.get(s.question, majority)),
    }


def _easy_vqa_extra(samples: list[EvalSample], preds: list[str], result: dict, data: Path) -> dict:
    """easy-vqa: the two baselines, from the train split beside the evaluated test split."""
    qdir = data if data.is_dir() else data.parent
    train = qdir.parent / "train" / "questions.json"
    if not train.is_file():
        logger.warning(f"{train}: not found, easy-vqa baselines skipped (they need the train split)")
        return {}
    return {"baselines": easy_vqa_baselines(samples, train)}


@dataclass(frozen=True)
class BenchmarkSpec:
    """How to read, prompt and score one benchmark."""

    name: str
    reader: Callable[..., list[EvalSample]]
    """reader(path, image_root) -> samples."""
    kind: str
    """Per-sample scorer: "short" (VQA soft accuracy / exact match), "yes_no", "choice", "mme_yes_no"."""
    description: str
    default_data: Callable[[], Path] | None = None
    """Where the data is when --data is not given (embedded assets only)."""
    extra_metrics: Callable[..., dict] | None = None
    """extra(samples, preds, result[, data]) -> keys merged into the result (may replace accuracy)."""
    needs_data_path: bool = False
    """Whether extra_metrics also takes the data path."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in [
        BenchmarkSpec(
            "easy_vqa",
            read_easy_vqa,
            "short",
            "easy-vqa test split (1,000 images, 9,673 questions)",
            default_easy_vqa_data,
            _easy_vqa_extra,
            needs_data_path=True,
        ),
        BenchmarkSpec("pope", read_pope, "yes_no", "POPE object hallucination (yes/no)", None, _pope_extra),
        BenchmarkSpec("mmvp", read_mmvp, "choice", "MMVP CLIP-blind pairs", None, _mmvp_extra),
        BenchmarkSpec("cv_bench", read_cv_bench, "choice", "CV-Bench 2D/3D", None, _cv_bench_extra),
        BenchmarkSpec("scienceqa_img", read_scienceqa_img, "choice", "ScienceQA image questions (test)"),
        BenchmarkSpec("vqa", read_vqa, "short", "short-answer VQA jsonl"),
        BenchmarkSpec("textvqa", read_vqa, "short", "TextVQA (soft accuracy over 10 answers)"),
        BenchmarkSpec("gqa", read_vqa, "short", "GQA (exact match)"),
        BenchmarkSpec("mme", read_mme, "mme_yes_no", "MME perception + cognition (yes/no)", None, _mme_extra),
        BenchmarkSpec("mmbench", read_mmbench, "choice", "MMBench dev, circular", None, _mmbench_extra),
        BenchmarkSpec("seed_bench", read_seed_bench, "choice", "SEED-Bench image questions (dimensions 1-9)"),
    ]
}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The spec named `name`; the error lists the known ones."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def load_samples(spec: BenchmarkSpec, data: Path | None, image_root: Path | None = None) -> tuple[list, Path]:
    """The samples of `spec` from `data` (or its default) and the path they came from."""
    if data is None:
        if spec.default_data is None:
            raise ValueError(f"benchmark {spec.name!r} has no embedded copy; pass --data PATH to its files")
        data = spec.default_data()
    data = Path(data)
    if not data.exists():
        raise FileNotFoundError(f"{data}: does not exist; pass --data to the {spec.name} files")
    return spec.reader(data, image_root), data


def score_predictions(spec: BenchmarkSpec, samples: list[EvalSample], preds: list[str], data: Path) -> tuple:
    """(result dict, per-sample scores) for predictions aligned with samples."""
    if len(samples) != len(preds):
        raise ValueError(f"{len(preds)} predictions for {len(samples)} samples")
    scorer = SCORERS[spec.kind]
    scores = [scorer(s, p) for s, p in zip(samples, preds)]
    result = {"benchmark": spec.name, **metrics.accuracy_by_category(scores, [s.category for s in samples])}
    if spec.extra_metrics is not None:
        args = (samples, preds, result, data) if spec.needs_data_path else (samples, preds, result)
        result.update(spec.extra_metrics(*args))
    return result, scores
