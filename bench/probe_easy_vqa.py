"""Does a trained model compare the attribute a yes/no question names with the one it sees?

`python bench/probe_easy_vqa.py --model runs/demo/sft/export [--predictions runs/demo/eval/easy_vqa_predictions.jsonl]`

1. From an easy-vqa predictions file (`python -m eve.eval`): yes/no accuracy split by whether the
   named attribute is the image's own ("match") or not ("miss"), for colour and shape questions.
   The balanced accuracy (mean of the two) is 50% for a model that answers from the question alone,
   however high its plain accuracy.
2. Linear probes (logistic regression, 900 train / 300 held-out train images) on the hidden state at
   the position that predicts the answer of "is there a {random colour} shape?" in the evaluation
   prompt, per layer: is the image's colour there, the asked colour, their match?
3. The same match probe at the asked colour word of the question ("...USER: <image>\nis there a
   red"), where the demo's stage-2 attribute checks teach the comparison.
4. No probe, the model's own output: the AUC of its "yes" minus "no" logit against the true answer,
   for colour and shape, positive ("is there a red shape?") and negated ("is there not a red
   shape?") questions (the named attribute is the image's own with odds 1/2; 300 test images
   each), at the answer position of the evaluation prompt, at the attribute word itself and at the
   end of the whole question as a plain stage-2 caption ("<image>is there a red shape?"). 0.5: the
   image is not read; 0: read but the negation ignored. The word and caption rows are for stage-2
   exports.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from data_curation.embedded import COLORS, SHAPES, easy_vqa_attributes, question_negated
from eve import EveForCausalLM, EveProcessor
from eve.assets import easy_vqa_dir
from eve.eval.benchmarks import SHORT_ANSWER_PROMPT


def match_split(path: str) -> None:
    """Print yes/no accuracy by (colour|shape) x (match|miss) and the balanced accuracy."""
    acc: dict[tuple[str, bool], list[float]] = defaultdict(list)
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r["category"] != "yes/no":
                continue
            match = (r["answers"][0] == "yes") != question_negated(r["question"])
            kind = "colour" if any(w in COLORS for w in r["question"].rstrip("?").split()) else "shape"
            acc[(kind, match)].append(r["score"])
    for kind in ("colour", "shape"):
        parts = {m: 100 * np.mean(acc[(kind, m)]) for m in (True, False)}
        print(
            f"{kind:7s} yes/no: match {parts[True]:5.1f}% ({len(acc[(kind, True)])}), "
            f"miss {parts[False]:5.1f}% ({len(acc[(kind, False)])}), balanced {np.mean(list(parts.values())):.1f}%"
        )


@torch.no_grad()
def last_position(model, processor, prompts: list[str], images: list[Image.Image], hidden: bool):
    """At the last prompt position, in batches of 100: the (N, layers + 1, D) hidden states with
    `hidden`, else the (N, V) logits."""
    rows = []
    for b in range(0, len(prompts), 100):
        out = model(**processor(prompts[b : b + 100], images[b : b + 100]), output_hidden_states=hidden)
        if hidden:
            rows.append(torch.stack([h[:, -1].float() for h in out.hidden_states], 1))
        else:
            rows.append(out.logits[:, -1].float())
    return torch.cat(rows).numpy()


def up_to_word(processor, text: str) -> str:
    """The vicuna_v1 prompt cut right after `text` ("...USER: <image>\nis there a red")."""
    return processor.build_prompt(text, "vicuna_v1").rsplit(" ASSISTANT:", 1)[0]


def held_out_start(n: int) -> int:
    """Probes fit on the first three quarters and are scored on the last quarter."""
    return int(0.75 * n)


def print_probes(h: np.ndarray, targets: dict[str, np.ndarray]) -> None:
    """Held-out accuracy (last quarter) of a logistic-regression probe per layer and target."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    cut = held_out_start(len(h))
    for layer in range(h.shape[1]):
        row = []
        for name, y in targets.items():
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(
                h[:cut, layer], y[:cut]
            )
            row.append(f"{name} {100 * clf.score(h[cut:, layer], y[cut:]):5.1f}%")
        print(f"layer {layer}: " + ", ".join(row))


def probes(model, processor, n: int = 1200, seed: int = 0) -> None:
    """Print held-out probe accuracy for image colour, asked colour and match at every layer, at the
    answer position; then for the match at the asked colour word itself (asked colour = the image's
    with odds 1/2), where stage 2's attribute checks teach the comparison."""
    split = easy_vqa_dir("train")
    attrs, _, _ = easy_vqa_attributes(split)
    ids = [i for i in sorted(attrs) if attrs[i][0] is not None][:n]
    images = [Image.open(split / "images" / f"{i}.png") for i in ids]
    colour = np.array([COLORS.index(attrs[i][0]) for i in ids])
    rng = random.Random(seed)

    asked = np.array([rng.randrange(len(COLORS)) for _ in ids])
    prompts = [
        processor.build_prompt(f"is there a {COLORS[q]} shape?\n{SHORT_ANSWER_PROMPT}", "vicuna_v1")
        for q in asked
    ]
    match = (colour == asked).astype(int)
    cut = held_out_start(len(ids))
    print(
        f"answer position, held-out probe accuracy ({len(ids) - cut} images; "
        f"chance: colours 12.5%, match {100 * (1 - match[cut:].mean()):.1f}%)"
    )
    h = last_position(model, processor, prompts, images, hidden=True)
    print_probes(h, {"image colour": colour, "asked colour": asked, "match": match})

    same = np.array([rng.random() < 0.5 for _ in ids])
    asked = np.where(
        same, colour, (colour + np.array([rng.randrange(1, len(COLORS)) for _ in ids])) % len(COLORS)
    )
    cut_after_word = [up_to_word(processor, f"is there a {COLORS[q]}") for q in asked]
    print("asked colour word (...USER: <image>\\nis there a red), match probe (chance ~50%)")
    h = last_position(model, processor, cut_after_word, images, hidden=True)
    print_probes(h, {"match": same.astype(int)})


def auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = score[positive][:, None], score[~positive][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def yes_no_aucs(model, processor, n: int = 300, seed: int = 0) -> None:
    """Print the AUC of the yes-minus-no logit per attribute, polarity and position (docstring, 4)."""
    tokenizer = processor.tokenizer
    yes, no = (tokenizer.convert_tokens_to_ids(t) for t in ("▁yes", "▁no"))
    split = easy_vqa_dir("test")
    attrs, _, _ = easy_vqa_attributes(split)
    print(f"yes-minus-no logit AUC against the true answer ({n} test images each; 0.5 = not read)")
    for kind, index, vocab, noun in (("colour", 0, COLORS, " shape"), ("shape", 1, SHAPES, "")):
        ids = [i for i in sorted(attrs) if attrs[i][index] is not None][:n]
        images = [Image.open(split / "images" / f"{i}.png") for i in ids]
        rng = random.Random(seed)
        own = np.array([rng.random() < 0.5 for _ in ids])
        named = [
            attrs[i][index] if same else rng.choice([v for v in vocab if v != attrs[i][index]])
            for i, same in zip(ids, own)
        ]
        row = []
        for negated, where in itertools.product((False, True), ("answer", "word", "caption")):
            start = "is there not a" if negated else "is there a"
            if where == "word":
                prompts = [up_to_word(processor, f"{start} {v}") for v in named]
            elif where == "caption":  # the whole question as a stage-2 caption (plain template)
                prompts = [f"<image>{start} {v}{noun}?" for v in named]
            else:
                question = f"{start} {{}}{noun}?\n{SHORT_ANSWER_PROMPT}"
                prompts = [processor.build_prompt(question.format(v), "vicuna_v1") for v in named]
            logits = last_position(model, processor, prompts, images, hidden=False)
            score = auc(logits[:, yes] - logits[:, no], own != negated)
            row.append(f"{'negated' if negated else 'positive'} at {where} {score:.3f}")
        print(f"{kind:7s} " + ", ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported checkpoint")
    parser.add_argument("--predictions", help="easy_vqa_predictions.jsonl from python -m eve.eval")
    parser.add_argument("--images", type=int, default=1200, help="train images for the probes")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.predictions:
        match_split(args.predictions)
    model = EveForCausalLM.from_pretrained(args.model).eval()
    processor = EveProcessor.from_pretrained(args.model)
    probes(model, processor, args.images)
    yes_no_aucs(model, processor)


if __name__ == "__main__":
    main()
