"""The embedded default sources: easy-vqa train images with colour+shape captions and scikit-image photos.

`python -m data_curation.embedded [--config configs/curation/embedded.yaml] [--embedded.dir DIR]`
(and `python -m data_curation.run` with `embedded.enabled: true`) writes into `embedded.dir`
- `easy_vqa/{train,test}/images` (links to the easy-vqa package's folders; copies where links fail)
  and `easy_vqa/{train,test}/questions.json`,
- `skimage_photos/` (a link to scikit-image's data folder),
- `sources.jsonl`: one `{"image", "caption", "source"}` per curation input (paths relative to it); an
  easy-vqa caption is `embedded.caption_checks` attribute checks of each attribute, then the
  description: "is there a red yes, is a circle no. A blue circle.",
- `sft_easy_vqa.json`: LLaVA JSON, conversations of `embedded.sft_turns` questions of one train image:
  its easy-vqa questions plus `embedded.sft_balanced` yes/no questions in the same forms that name the
  image's own attribute half of the time; a share `embedded.sft_plain_share` of the questions come
  bare, the others followed by the short-answer instruction of the evaluation prompt (as LLaVA-1.5
  mixes both), so that the model answers a plain question as it answers the evaluation's.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from eve.console import setup_logging

from .common import write_json_atomic, write_jsonl_atomic
from .config import EmbeddedConfig, parse_step_args

logger = logging.getLogger(__name__)

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


# The starts of easy-vqa's non-negated yes/no questions that precede the attribute (see attribute_checks)
CHECK_PREFIXES = ("is there a", "is a", "does the image contain a")


def name_attribute(value: str, vocab: tuple[str, ...], rng: random.Random) -> tuple[str, bool]:
    """(an attribute to ask about, whether it is `value`): `value` itself or another with equal odds."""
    same = rng.random() < 0.5
    return (value if same else rng.choice([v for v in vocab if v != value])), same


def attribute_checks(
    colour: str | None, shape: str | None, rng: random.Random, per_attribute: int = 1
) -> str:
    """ "is there a red yes, is a circle no.": `per_attribute` checks of the colour, then of the shape.

    Each check is the start of an easy-vqa yes/no question (non-negated) cut right after its
    attribute, then whether the image has that attribute; the attribute named is the image's own or
    another with equal odds, so the verdict cannot be read off the text. The verdict follows the
    attribute word directly, so stage 2 trains the comparison of the named attribute with the image
    at the position of that word, the position where the evaluation prompt names the attribute it
    asks about. Several checks of one attribute name different values: until the image's own has
    been named, each names it with odds 1/2, so the verdict of every check up to the first "yes" is
    unknown from the text. An unknown attribute gets no check.
    """
    checks = []
    for value, vocab in ((colour, COLORS), (shape, SHAPES)):
        named: list[str] = []
        for _ in range(per_attribute if value is not None else 0):
            others = [v for v in vocab if v != value and v not in named]
            if value in named:
                if not others:
                    break
                name = rng.choice(others)
            else:
                name = value if rng.random() < 0.5 or not others else rng.choice(others)
            named.append(name)
            checks.append(f"{rng.choice(CHECK_PREFIXES)} {name} {'yes' if name == value else 'no'}")
    return f"{', '.join(checks)}." if checks else ""


def yes_no_templates(per_image: dict[int, list[tuple[str, str]]]) -> dict[str, list[str]]:
    """The yes/no question forms of the train split, by the attribute they name.

    "is there not a red shape?" -> "is there not a {} shape?" under "colour"; "is a circle present?"
    -> "is a {} present?" under "shape". Sorted, so that the same questions give the same forms.
    """
    forms: dict[str, set[str]] = {"colour": set(), "shape": set()}
    for qa in per_image.values():
        for q, a in qa:
            if a not in ("yes", "no"):
                continue
            words = q.rstrip("?").split()
            for kind, vocab in (("colour", COLORS), ("shape", SHAPES)):
                hits = [k for k, w in enumerate(words) if w in vocab]
                if len(hits) == 1:
                    words[hits[0]] = "{}"
                    forms[kind].add(" ".join(words) + "?")
    return {kind: sorted(v) for kind, v in forms.items()}


def balanced_questions(
    colour: str | None, shape: str | None, forms: dict[str, list[str]], n: int, rng: random.Random
) -> list[tuple[str, str]]:
    """`n` yes/no questions about an image, half naming its own attribute, in the train split's forms.

    easy-vqa's own yes/no questions name the image's attribute rarely (about 1 in 8 colour and 1 in 3
    shape questions), so the question alone answers most of them and the comparison of the named
    attribute with the image gets little gradient. Here the named attribute is the image's own with
    odds 1/2, so the answer cannot be read off the text; the truth comes from the train answers (or the
    pixels where they do not tell), never from the test split.
    """
    kinds = [(k, v, vocab) for k, v, vocab in (("colour", colour, COLORS), ("shape", shape, SHAPES)) if v]
    out = []
    for j in range(n if kinds else 0):
        kind, value, vocab = kinds[j % len(kinds)]
        form = rng.choice(forms[kind])
        named, same = name_attribute(value, vocab, rng)
        out.append((form.format(named), "yes" if same != question_negated(form) else "no"))
    return out


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


def build(cfg: EmbeddedConfig, seed: int = 0) -> dict:
    """Write the embedded default sources into `cfg.dir` (`seed`: the order of the SFT samples and the
    attributes the caption checks name); returns counts."""
    from eve.assets import SKIMAGE_PHOTOS, easy_vqa_dir, skimage_data_dir  # asset paths only
    from eve.eval.benchmarks import SHORT_ANSWER_PROMPT

    out = Path(cfg.dir)
    for split in ("train", "test"):
        src = easy_vqa_dir(split)
        link_or_copy(src / "images", out / "easy_vqa" / split / "images")
        link_or_copy(src / "questions.json", out / "easy_vqa" / split / "questions.json")
    link_or_copy(skimage_data_dir(), out / "skimage_photos")

    attrs, per_image, how = easy_vqa_attributes(easy_vqa_dir("train"))
    check_rng = random.Random(f"checks-{seed}")
    rows = []
    for i in sorted(per_image):
        caption = " ".join(
            p
            for p in (attribute_checks(*attrs[i], check_rng, cfg.caption_checks), caption_for(*attrs[i]))
            if p
        )
        rows.append(
            {"image": f"easy_vqa/train/images/{i}.png", "caption": caption, "source": "easy_vqa_train"}
        )
    for name in SKIMAGE_PHOTOS:
        stem = Path(name).stem
        caption = SKIMAGE_CAPTIONS.get(stem, f"A photo of a {stem.replace('_', ' ')}.")
        rows.append({"image": f"skimage_photos/{name}", "caption": caption, "source": "skimage"})
    write_jsonl_atomic(out / "sources.jsonl", rows)

    rng = random.Random(seed)
    forms = yes_no_templates(per_image)
    sft, synthetic, plain = [], 0, 0
    for i in sorted(per_image):
        extra = balanced_questions(*attrs[i], forms, cfg.sft_balanced, rng)
        synthetic += len(extra)
        qa = list(per_image[i]) + extra
        if not qa:
            continue
        rng.shuffle(qa)
        step = cfg.sft_turns if cfg.sft_turns > 0 else len(qa)
        for c in range(0, len(qa), step):
            conv = []
            for t, (q, a) in enumerate(qa[c : c + step]):
                bare = cfg.sft_plain_share > 0 and rng.random() < cfg.sft_plain_share
                plain += bare
                text = q if bare else f"{q}\n{SHORT_ANSWER_PROMPT}"
                conv.append({"from": "human", "value": f"<image>\n{text}" if t == 0 else text})
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
        "sft_questions": sum(len(qa) for qa in per_image.values()) + synthetic,
        "sft_balanced_questions": synthetic,
        "sft_plain_questions": plain,
        **how,
    }
    logger.info("embedded sources in %s: %s", out, counts)
    return counts


def main(argv: list[str] | None = None) -> None:
    """`python -m data_curation.embedded [--config X.yaml] [--embedded.dir DIR] [--seed N]`."""
    setup_logging()
    cfg, _ = parse_step_args(argv)
    build(cfg.embedded, cfg.seed)


if __name__ == "__main__":
    main()
