"""The embedded default sources: easy-vqa train images with colour+shape captions and scikit-image photos.

`python -m data_curation.embedded --out runs/demo/data` writes
- `easy_vqa/{train,test}/images` (links to the easy-vqa package's folders; copies where links fail)
  and `easy_vqa/{train,test}/questions.json`,
- `skimage_photos/` (a link to scikit-image's data folder),
- `sources.jsonl`: one `{"image", "caption", "source"}` per curation input (paths relative to it),
- `sft_easy_vqa.json`: LLaVA JSON, conversations of `sft_turns` questions of one train image (0: all).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from .common import logger, setup_logging, write_json_atomic, write_jsonl_atomic

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
LEARN_IMAGES = 600  # images with known attributes used to learn the palette and shape fill ratios

# Captions of the scikit-image photos (eve.assets.SKIMAGE_PHOTOS); others get "A photo of a {name}."
SKIMAGE_CAPTIONS = {
    "astronaut": "A photo of an astronaut.",
    "brick": "A photo of a brick wall.",
    "camera": "A black and white photo of a man with a camera.",
    "cell": "A microscope image of a cell.",
    "chelsea": "A photo of a cat.",
    "chessboard_GRAY": "A grey chessboard pattern.",
    "chessboard_RGB": "A chessboard pattern.",
    "clock_motion": "A blurred photo of a clock.",
    "coffee": "A photo of a cup of coffee.",
    "coins": "A photo of old coins.",
    "color": "A chart of colours.",
    "grass": "A photo of grass.",
    "gravel": "A photo of gravel.",
    "horse": "A silhouette of a horse.",
    "hubble_deep_field": "A photo of galaxies in deep space.",
    "ihc": "A microscope image of stained tissue.",
    "logo": "The scikit-image logo.",
    "microaneurysms": "A photo of a retina with microaneurysms.",
    "moon": "A photo of the surface of the moon.",
    "motorcycle_left": "A photo of a motorcycle.",
    "motorcycle_right": "A photo of a motorcycle.",
    "page": "A scanned page of text.",
    "phantom": "A phantom image of a head scan.",
    "retina": "A photo of a human retina.",
    "rocket": "A photo of a rocket on a launch pad.",
    "text": "A photo of text.",
}


def question_negated(question: str) -> bool:
    """Whether an easy-vqa yes/no question is negated ("is there not a ...", "is no ... present?")."""
    words = question.rstrip("?").split()
    return "not" in words or "no" in words


def attributes_from_questions(qa: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """(colour, shape) implied by an image's questions and answers, None where they do not tell.

    "what color is the triangle?" -> blue gives both; yes/no questions ("is there not a red shape?"
    -> yes) rule attributes in or out; a single attribute left after ruling out the others is taken.
    """
    present, absent = set(), set()
    for q, a in qa:
        words = q.rstrip("?").split()
        mentioned = {w for w in words if w in SHAPES or w in COLORS}
        if a in ("yes", "no"):
            truth = (a == "yes") != question_negated(q)
            (present if truth else absent).update(mentioned)
        else:  # an open question presupposes what it mentions, and its answer is an attribute
            present.update(mentioned | {a})

    def pick(vocab: tuple[str, ...]) -> str | None:
        found = [v for v in vocab if v in present]
        if len(found) > 1:
            raise ValueError(f"easy-vqa answers contradict each other: {found} in {qa}")
        left = [v for v in vocab if v not in absent]
        return found[0] if found else (left[0] if len(left) == 1 else None)

    return pick(COLORS), pick(SHAPES)


def pixel_attributes(path: Path) -> tuple[tuple[int, int, int], float]:
    """(the shape's exact RGB colour, fill ratio of its bounding box) of an easy-vqa image.

    easy-vqa draws one shape in a palette colour on a light background: the most common pixel is
    the background, the next most common the shape's colour. Fill ratio: ~1 rectangle, ~0.79 circle,
    ~0.5 triangle.
    """
    arr = np.asarray(Image.open(path).convert("RGB")).astype(np.int32)  # (64, 64, 3)
    packed = (arr[..., 0] << 16 | arr[..., 1] << 8 | arr[..., 2]).ravel()  # (4096,) one int per colour
    values, counts = np.unique(packed, return_counts=True)
    top = np.argsort(-counts, kind="stable")
    bg, fg = (np.array([v >> 16, (v >> 8) & 255, v & 255]) for v in values[top[:2]])
    mask = ((arr - fg) ** 2).sum(-1) < ((arr - bg) ** 2).sum(-1)  # (64, 64) closer to shape than background
    ys, xs = np.nonzero(mask)
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return (int(fg[0]), int(fg[1]), int(fg[2])), float(mask.sum() / area)


def easy_vqa_attributes(
    split_dir: Path,
) -> tuple[dict[int, tuple[str, str]], dict[int, list[tuple[str, str]]], Counter]:
    """(colour, shape) of every image of a split, and its questions: from the answers, else the pixels.

    Pixels fill the gaps: the palette (RGB -> colour name) and mean fill ratio per shape are learnt
    from the images whose answers name them, then applied to the others.
    """
    qs = json.loads((split_dir / "questions.json").read_text())
    per_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in qs:
        per_image[int(i)].append((q, a))
    from_answers = {i: attributes_from_questions(qa) for i, qa in per_image.items()}
    # Learn from the first images whose answers name both attributes (enough to meet every colour and
    # shape many times), and read the pixels of the images that need them.
    learn = [i for i in sorted(from_answers) if None not in from_answers[i]][:LEARN_IMAGES]
    need = [i for i in sorted(from_answers) if None in from_answers[i]]
    pix = {i: pixel_attributes(split_dir / "images" / f"{i}.png") for i in learn + need}
    palette: dict[tuple, Counter] = defaultdict(Counter)
    fills: dict[str, list[float]] = defaultdict(list)
    for i in learn:
        c, s = from_answers[i]
        if c:
            palette[pix[i][0]][c] += 1
        if s:
            fills[s].append(pix[i][1])
    mean_fill = {s: float(np.mean(v)) for s, v in fills.items()}
    out, how = {}, Counter()
    for i, (c, s) in from_answers.items():
        if c is None:
            c = palette[pix[i][0]].most_common(1)[0][0] if palette.get(pix[i][0]) else None
            how["colour_from_pixels" if c else "colour_unknown"] += 1
        if s is None:
            s = min(mean_fill, key=lambda k: abs(mean_fill[k] - pix[i][1]))
            how["shape_from_pixels"] += 1
        out[i] = (c, s)
    return out, per_image, how


def caption_for(colour: str | None, shape: str | None) -> str:
    """ "A blue circle." (or "A circle." / "A blue shape." when one attribute is unknown)."""
    words = [w for w in (colour, shape or "shape") if w]
    return f"A {' '.join(words)}."


CAPTION_CHECKS = ("none", "tags", "questions", "positive")  # build(caption_checks=...); see attribute_checks

# What precedes the attribute in easy-vqa's yes/no questions: (prefix, negated)
CHECK_PREFIXES = (
    ("is there a", False),
    ("is a", False),
    ("does the image contain a", False),
    ("is there not a", True),
    ("is no", True),
    ("does the image not contain a", True),
)


def name_attribute(value: str, vocab: tuple[str, ...], rng: random.Random) -> tuple[str, bool]:
    """(an attribute to ask about, whether it is `value`): `value` itself or another with equal odds."""
    same = rng.random() < 0.5
    return (value if same else rng.choice([v for v in vocab if v != value])), same


def attribute_checks(
    colour: str | None, shape: str | None, rng: random.Random, phrased: bool = False, negated: bool = True
) -> str:
    """ "red yes, circle no.": one colour and one shape, each the image's own or another with equal odds.

    With `phrased`, each check is the start of an easy-vqa yes/no question cut right after its
    attribute, then whether the question is true: "is no red yes, is there a circle no."; with
    `negated=False` only the non-negated starts are used ("is there a red yes", the demo's default).

    Each named attribute is followed directly by its verdict, so the verdict is predicted at the very
    position whose token names the attribute: the queried word is the position's own input and the
    image is one attention away. A tiny LLM learns this comparison there within a few hundred steps;
    asked as a question ("is there a red shape?" ... "no"), the verdict comes several tokens later and
    it does not learn it at all in the demo's budget. After the demo's stage 2 with the positive
    phrasing, the yes-minus-no AUC at the attribute word of the evaluation prompt is 0.97 for colours
    and 0.79 for shapes (`bench/probe_easy_vqa.py`). With an earlier script (balanced accuracy at the
    median, 400 test images, not kept) bare tags got colour right 94% in their own form but 66% at
    the colour word of a real question, and the fully phrased checks, whose verdict also depends on a
    negation, stayed at chance (50%). SFT at the demo's LR 3e-4 then reads the check for some answers:
    "is there a red shape?" about a red image goes from always "no" to "yes" ~35% of the time (negated
    questions stay at the prior). An unknown attribute is left out.
    """
    checks = []
    for value, vocab in ((colour, COLORS), (shape, SHAPES)):
        if value is None:
            continue
        named, same = name_attribute(value, vocab, rng)
        if phrased:
            prefix, neg = rng.choice([p for p in CHECK_PREFIXES if negated or not p[1]])
            checks.append(f"{prefix} {named} {'yes' if same != neg else 'no'}")
        else:
            checks.append(f"{named} {'yes' if same else 'no'}")
    return f"{', '.join(checks)}." if checks else ""


CAPTION_QUESTIONS = ("none", "positive", "all")  # build(caption_questions=...); see yes_no_pairs


def question_templates(questions: list[tuple[str, str]]) -> dict[str, list[str]]:
    """easy-vqa's yes/no question phrasings with the attribute as "{}", per kind ("colour", "shape").

    "is there a red shape?" -> "is there a {} shape?" (colour); "is no circle present?" -> "is no {}
    present?" (shape). Sorted, so the same questions give the same list.
    """
    out: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for q, a in questions:
        if a not in ("yes", "no"):
            continue
        words = q.split(" ")
        for kind, vocab in (("colour", COLORS), ("shape", SHAPES)):
            hits = [j for j, w in enumerate(words) if w.rstrip("?") in vocab]
            if hits:
                j = hits[0]
                words[j] = "{}" + ("?" if words[j].endswith("?") else "")
                out[kind].add(" ".join(words))
    return {k: sorted(v) for k, v in out.items()}


def yes_no_pairs(
    colour: str | None,
    shape: str | None,
    templates: dict[str, list[str]],
    rng: random.Random,
    negated: bool = True,
) -> list[tuple[str, str]]:
    """[("is there a red shape?", "no"), ("is no circle present?", "no")]: one yes/no question per attribute.

    Each names the image's own attribute or another with equal odds (so the answer cannot be read off
    the question, unlike easy-vqa's own questions, 82.5% of which the question alone answers), in one
    of easy-vqa's phrasings (negated ones only with `negated`), with its true answer.
    """
    pairs = []
    for value, vocab, kind in ((colour, COLORS, "colour"), (shape, SHAPES, "shape")):
        if value is None:
            continue
        named, same = name_attribute(value, vocab, rng)
        tpl = rng.choice([t for t in templates[kind] if negated or not question_negated(t)])
        pairs.append((tpl.format(named), "yes" if same != question_negated(tpl) else "no"))
    return pairs


def link_or_copy(target: Path, link: Path) -> None:
    """Symlink `link` -> `target`; copy when links are not possible (e.g. some Windows/CI filesystems)."""
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        raise FileExistsError(f"{link} exists and is not a link to {target}; remove it and re-run")
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(target.resolve(), target_is_directory=target.is_dir())
    except OSError:
        (shutil.copytree if target.is_dir() else shutil.copy2)(target, link)


def balance_yes_no(
    per_image: dict[int, list[tuple[str, str]]], seed: int
) -> dict[int, list[tuple[str, str]]]:
    """Drop majority answers of each yes/no question string until "yes" and "no" are equally common.

    The answer then cannot be read off the question (as VQA v2 balanced its questions): a model has
    to look at the image. Other questions are kept. Seeded, so the same data gives the same subset.
    """
    by_question: dict[str, dict[str, list[tuple[int, int]]]] = {}
    for image, qa in per_image.items():
        for j, (q, a) in enumerate(qa):
            if a in ("yes", "no"):
                by_question.setdefault(q, {"yes": [], "no": []})[a].append((image, j))
    rng = random.Random(seed)
    dropped: set[tuple[int, int]] = set()
    for q in sorted(by_question):
        yes, no = by_question[q]["yes"], by_question[q]["no"]
        majority, n_keep = (yes, len(no)) if len(yes) > len(no) else (no, len(yes))
        dropped.update(rng.sample(majority, len(majority) - n_keep))
    return {i: [x for j, x in enumerate(qa) if (i, j) not in dropped] for i, qa in per_image.items()}


def build(
    out: str | Path,
    seed: int = 0,
    sft_turns: int = 0,
    sft_instruction: bool = True,
    sft_balance: bool = False,
    caption_checks: str = "none",
    caption_questions: str = "none",
    sft_synthetic: int = 0,
) -> dict:
    """Write the embedded default sources under `out`; returns counts.

    `sft_turns` questions of an image go into one conversation (0: all of them). Fewer turns cost more
    tokens per answer but leave less to read off earlier answers: the evaluation asks one question at
    a time. `sft_instruction` appends the short-answer instruction that the evaluation prompt ends with.
    `sft_balance` balances yes/no answers per question string (`balance_yes_no`).
    `caption_checks` "tags" or "questions" starts each easy-vqa caption with `attribute_checks` ("red
    yes, circle no. A blue circle.", or phrased as questions), seeded; "none" (the default) leaves
    them out (see `attribute_checks` for why); "positive" phrases them with the non-negated question
    starts only ("is there a red yes, is a circle no.").
    `caption_questions` "positive" or "all" puts whole yes/no questions with their answers after the
    checks (`yes_no_pairs`: "is there a red shape? no. is a circle present? yes."), seeded; with or
    without checks, a tiny LLM did not learn to answer them from the image (README, easy-vqa).
    `sft_synthetic` adds that many `yes_no_pairs` per train image to its SFT questions.
    """
    from eve.assets import SKIMAGE_PHOTOS, easy_vqa_dir, skimage_data_dir  # asset paths only
    from eve.eval.benchmarks import SHORT_ANSWER_PROMPT

    if caption_questions not in CAPTION_QUESTIONS:
        raise ValueError(f"caption_questions must be one of {CAPTION_QUESTIONS}, got {caption_questions!r}")
    if caption_checks not in CAPTION_CHECKS:
        raise ValueError(f"caption_checks must be one of {CAPTION_CHECKS}, got {caption_checks!r}")
    out = Path(out)
    for split in ("train", "test"):
        src = easy_vqa_dir(split)
        link_or_copy(src / "images", out / "easy_vqa" / split / "images")
        link_or_copy(src / "questions.json", out / "easy_vqa" / split / "questions.json")
    link_or_copy(skimage_data_dir(), out / "skimage_photos")

    attrs, per_image, how = easy_vqa_attributes(easy_vqa_dir("train"))
    check_rng = random.Random(f"checks-{seed}")
    question_rng = random.Random(f"questions-{seed}")
    templates = question_templates([qa for qas in per_image.values() for qa in qas])
    rows = []
    for i in sorted(per_image):
        parts = []  # checks, then whole questions, then the description
        if caption_checks != "none":
            phrased, negated = caption_checks in ("questions", "positive"), caption_checks == "questions"
            parts.append(attribute_checks(*attrs[i], check_rng, phrased=phrased, negated=negated))
        if caption_questions != "none":
            negated = caption_questions == "all"
            pairs = yes_no_pairs(*attrs[i], templates, question_rng, negated=negated)
            parts += [f"{q} {a}." for q, a in pairs]
        caption = " ".join([p for p in parts if p] + [caption_for(*attrs[i])])
        rows.append(
            {"image": f"easy_vqa/train/images/{i}.png", "caption": caption, "source": "easy_vqa_train"}
        )
    for name in SKIMAGE_PHOTOS:
        stem = Path(name).stem
        caption = SKIMAGE_CAPTIONS.get(stem, f"A photo of a {stem.replace('_', ' ')}.")
        rows.append({"image": f"skimage_photos/{name}", "caption": caption, "source": "skimage"})
    write_jsonl_atomic(out / "sources.jsonl", rows)

    rng = random.Random(seed)
    sft_qa = balance_yes_no(per_image, seed) if sft_balance else per_image
    if sft_synthetic:
        synth_rng = random.Random(f"sft-synthetic-{seed}")
        sft_qa = {
            i: list(qa)
            + [p for _ in range(sft_synthetic) for p in yes_no_pairs(*attrs[i], templates, synth_rng)]
            for i, qa in sft_qa.items()
        }
    sft = []
    for i in sorted(sft_qa):
        qa = list(sft_qa[i])
        if not qa:
            continue
        rng.shuffle(qa)
        step = sft_turns if sft_turns > 0 else len(qa)
        for c in range(0, len(qa), step):
            conv = []
            for t, (q, a) in enumerate(qa[c : c + step]):
                q = f"{q}\n{SHORT_ANSWER_PROMPT}" if sft_instruction else q
                conv.append({"from": "human", "value": f"<image>\n{q}" if t == 0 else q})
                conv.append({"from": "gpt", "value": a})
            sample_id = f"easy_vqa_train_{i}" + (f"_{c // step}" if step < len(qa) else "")
            sft.append({"id": sample_id, "image": f"easy_vqa/train/images/{i}.png", "conversations": conv})
    rng.shuffle(sft)
    write_json_atomic(out / "sft_easy_vqa.json", sft)
    counts = {
        "sources": len(rows),
        "easy_vqa_train": len(per_image),
        "skimage": len(SKIMAGE_PHOTOS),
        "sft_samples": len(sft),
        "sft_questions": sum(len(qa) for qa in sft_qa.values()),
        **how,
    }
    logger.info("embedded sources in %s: %s", out, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.embedded --out runs/demo/data [--seed 0]`."""
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/data", help="output folder (default runs/demo/data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SFT sample order")
    parser.add_argument("--sft-turns", type=int, default=0, help="questions per SFT conversation (0: all)")
    parser.add_argument(
        "--no-sft-instruction", action="store_true", help="do not append the short-answer instruction"
    )
    parser.add_argument(
        "--sft-balance", action="store_true", help="balance yes/no answers per question string"
    )
    parser.add_argument(
        "--caption-checks",
        choices=CAPTION_CHECKS,
        default="none",
        help='start easy-vqa captions with attribute checks: "red yes, circle no. A blue circle." (tags), '
        '"is no red yes, is there a circle no. ..." (questions) or "is there a red yes, is a circle no. ..." '
        "(positive)",
    )
    parser.add_argument(
        "--caption-questions",
        choices=CAPTION_QUESTIONS,
        default="none",
        help='whole yes/no questions and answers after the checks of easy-vqa captions: "is there a red '
        'shape? no. is no circle present? no. A blue circle." (all; positive: no negated phrasings)',
    )
    parser.add_argument(
        "--sft-synthetic",
        type=int,
        default=0,
        help="per train image, this many extra balanced yes/no question pairs (colour + shape) in the SFT set",
    )
    args = parser.parse_args(argv)
    build(
        args.out,
        args.seed,
        args.sft_turns,
        not args.no_sft_instruction,
        args.sft_balance,
        caption_checks=args.caption_checks,
        caption_questions=args.caption_questions,
        sft_synthetic=args.sft_synthetic,
    )


if __name__ == "__main__":
    main()
