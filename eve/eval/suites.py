"""Readers of the MME, MMBench and SEED-Bench releases (public layouts, field names as spelled there).

- mme: the official MME release folder (`MME_Benchmark_release_version/`), one folder per subtask.
  Subtasks whose images sit in `{subtask}/images/` keep their question files in
  `{subtask}/questions_answers_YN/{name}.txt` (artwork, celebrity, landmark, posters, scene); the
  others keep `{name}.txt` beside `{name}.jpg`/`.png` in `{subtask}/`. Each question file holds one
  `question<TAB>Yes|No` line per question, two per image. Category = subtask folder name.
- mmbench: the MMBench dev TSV (`MMBench_DEV_EN.tsv`): columns `index`, `question`, `hint`, `A`..`D`
  (empty past the last option), `answer` (a letter), `category`, `image` (base64). Each question
  becomes one sample per rotation of its options (N options -> N samples, the answer letter moving);
  images are decoded once into `--image-root` or else `{tsv stem}_images/` beside the TSV.
- seed_bench: `SEED-Bench.json` (`{"questions": [{question_id, question, choice_a..choice_d, answer,
  question_type_id, data_id, data_type}], "question_type": {name: id}}`) with images in
  `SEED-Bench-image/{data_id}`; only the image questions (dimensions 1-9) are read.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
import sys
from pathlib import Path

from eve.eval import metrics
from eve.eval.files import EvalSample, ImageResolver, find_file

logger = logging.getLogger(__name__)

MME_SUBTASKS = metrics.MME_PERCEPTION + metrics.MME_COGNITION
SEED_IMAGE_DIMENSIONS = {
    1: "Scene Understanding",
    2: "Instance Identity",
    3: "Instance Attributes",
    4: "Instance Location",
    5: "Instances Counting",
    6: "Spatial Relation",
    7: "Instance Interaction",
    8: "Visual Reasoning",
    9: "Text Understanding",
}
"""SEED-Bench's image dimensions by `question_type_id` (the file's own `question_type` map wins)."""


def _mme_question_files(task_dir: Path) -> tuple[list[Path], Path]:
    """(question .txt files, folder holding their images) of one MME subtask folder."""
    qa_dir = task_dir / "questions_answers_YN"
    if qa_dir.is_dir():
        return sorted(qa_dir.glob("*.txt")), task_dir / "images"
    return sorted(task_dir.glob("*.txt")), task_dir


def read_mme(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """MME release folder: each subtask's `question<TAB>answer` files, two questions per image."""
    if not path.is_dir():
        raise ValueError(f"{path}: MME is read from its release folder (one folder per subtask); pass that")
    tasks = [t for t in MME_SUBTASKS if (path / t).is_dir()]
    if not tasks:
        raise FileNotFoundError(
            f"{path}: no MME subtask folders ({', '.join(MME_SUBTASKS[:3])}, ...); pass --data to "
            "MME_Benchmark_release_version/"
        )
    samples, n_total = [], 0
    for task in tasks:
        qfiles, image_dir = _mme_question_files(path / task)
        images = ImageResolver([image_root / task if image_root else None, image_dir])
        for qfile in qfiles:
            lines = [line for line in qfile.read_text(encoding="utf-8").splitlines() if line.strip()]
            n_total += len(lines)
            # The image shares the question file's name, as .jpg in most subtasks and .png in a few.
            names = [qfile.stem + ext for ext in (".jpg", ".png")]
            image = images(next((n for n in names for r in images.roots if (r / n).is_file()), names[0]))
            if image is None:
                continue
            for k, line in enumerate(lines):
                question, sep, answer = line.rpartition("\t")
                if not sep or answer.strip().lower() not in ("yes", "no"):
                    raise ValueError(f"{qfile}:{k + 1}: {line!r} is not 'question<TAB>Yes|No'")
                samples.append(
                    EvalSample(
                        f"{task}/{qfile.stem}/{k}",
                        question.strip(),
                        [answer.strip().lower()],
                        image,
                        category=task,
                        meta={"image_id": f"{task}/{qfile.stem}"},
                    )
                )
        images.report(path / task, len(qfiles))
    logger.info(f"{path}: {len(samples)} of {n_total} MME questions over {len(tasks)} subtasks")
    return samples


def _present(value: str | None) -> bool:
    """Whether a TSV cell holds a value (pandas writes a missing option as '' or 'nan')."""
    return value is not None and value.strip() not in ("", "nan", "NaN", "None")


def _decode_image(b64: str, folder: Path, index: str) -> Path | None:
    """The image of MMBench row `index` as a file in `folder` (decoded once); None if unreadable."""
    for ext in (".png", ".jpg"):
        if (folder / f"{index}{ext}").is_file():
            return folder / f"{index}{ext}"
    try:
        raw = base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError):
        return None
    if not raw:
        return None
    ext = ".png" if raw.startswith(b"\x89PNG") else ".jpg"  # PIL reads either by content anyway
    out = folder / f"{index}{ext}"
    out.write_bytes(raw)
    return out


def read_mmbench(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """MMBench TSV: one sample per rotation of each question's options (circular evaluation)."""
    tsv = find_file(path, ["MMBench_DEV_EN.tsv", "mmbench_dev_en.tsv"], "MMBench dev .tsv")
    folder = image_root or tsv.parent / f"{tsv.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(sys.maxsize)  # the base64 image column is far past csv's 128 KiB default
    with tsv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    samples, unreadable = [], []
    for row in rows:
        index = row["index"].strip()
        if not _present(row.get("answer")):
            raise ValueError(
                f"{tsv}: question {index} has no 'answer'; the test TSV hides answers, use MMBench_DEV_EN.tsv"
            )
        options = [row[L] for L in "ABCD" if _present(row.get(L))]  # letters in order, none skipped
        answer = metrics.LETTERS.index(metrics.letter_of(row["answer"]))
        image = _decode_image(row.get("image") or "", folder, index)
        if image is None:
            unreadable.append(index)
            continue
        hint = row.get("hint", "")
        for k in range(len(options)):  # rotation k: option i of the pass is original option (i + k) % N
            choices = options[k:] + options[:k]
            samples.append(
                EvalSample(
                    f"{index}/r{k}",
                    row["question"],
                    [metrics.LETTERS[(answer - k) % len(options)]],
                    image,
                    category=row.get("category") or "all",
                    choices=choices,
                    context=hint.strip() if _present(hint) else "",
                    meta={"question": index},
                )
            )
    if unreadable:
        msg = f"{tsv}: {len(unreadable)} of {len(rows)} questions skipped, 'image' is not base64 (first: {unreadable[0]})"
        if len(unreadable) == len(rows):
            raise ValueError(msg + "; use the official TSV with the image column")
        logger.warning(msg)
    return samples


def read_seed_bench(path: Path, image_root: Path | None = None) -> list[EvalSample]:
    """SEED-Bench.json image questions (dimensions 1-9) with images in SEED-Bench-image/."""
    qfile = find_file(path, ["SEED-Bench.json"], "SEED-Bench.json")
    data = json.loads(qfile.read_text(encoding="utf-8"))
    if not (isinstance(data, dict) and "questions" in data):
        raise ValueError(
            f"{qfile}: expected {{'questions': [...]}}, the layout of the official SEED-Bench.json"
        )
    names = {**SEED_IMAGE_DIMENSIONS, **{int(i): n for n, i in data.get("question_type", {}).items()}}
    rows = [
        q
        for q in data["questions"]
        if q.get("data_type", "image") == "image" and int(q["question_type_id"]) in SEED_IMAGE_DIMENSIONS
    ]
    images = ImageResolver([image_root, qfile.parent / "SEED-Bench-image", qfile.parent])
    samples = []
    for q in rows:
        rel = str(q["data_id"])
        image = images(rel if Path(rel).suffix else f"{rel}.jpg")
        if image is not None:
            samples.append(
                EvalSample(
                    str(q["question_id"]),
                    q["question"],
                    [metrics.letter_of(q["answer"])],
                    image,
                    category=names[int(q["question_type_id"])],
                    choices=[str(q[f"choice_{c}"]) for c in "abcd"],
                )
            )
    images.report(qfile, len(rows))
    return samples
