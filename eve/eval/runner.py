"""Evaluate an exported EVE checkpoint on a benchmark: greedy batched generation, JSON + table.

Loading and generation are `eve.inference`'s; this module holds what is specific to benchmarks
(prompts from questions, scoring, the result files and the table).

`python -m eve.eval --model DIR --benchmark NAME [--data PATH] [--image-root DIR] --out DIR
[--batch-size N] [--limit N] [--max-new-tokens N]` writes `{out}/{benchmark}.json`
(`{"accuracy", "n", "per_category", ...benchmark metrics}`) and `{out}/{benchmark}_predictions.jsonl`,
and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from eve.eval.benchmarks import (
    BENCHMARKS,
    EvalSample,
    build_question,
    get_benchmark,
    load_samples,
    score_predictions,
)
from eve.inference import DTYPES, generate_all, length_order, load_model

logger = logging.getLogger(__name__)


def predict(
    model,
    processor,
    samples: Sequence[EvalSample],
    batch_size: int = 16,
    max_new_tokens: int = 16,
    template: str | None = None,
    progress: bool = True,
    answer_instruction: bool = True,
) -> list[str]:
    """Greedy answers for `samples`, in their order; generated in length-sorted batches ("" if unreadable)."""
    prompts = [
        processor.build_prompt(
            build_question(s, answer_instruction), template, s.image is not None, instruct=False
        )
        for s in samples
    ]
    images = [s.image for s in samples]
    order = length_order(prompts, images, processor.image_processor)
    answers = generate_all(
        model, processor, prompts, images, batch_size, max_new_tokens, order, progress, desc="eval"
    )
    unreadable = [s.id for s, a in zip(samples, answers) if a is None]
    if unreadable:
        logger.warning(
            f"{len(unreadable)} questions had unreadable images (first: {unreadable[0]}); scored as wrong"
        )
    return ["" if a is None else a for a in answers]


def evaluate(
    model_dir: str | Path,
    benchmark: str,
    out_dir: str | Path,
    data: str | Path | None = None,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 16,
    template: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    model_and_processor: tuple | None = None,
    progress: bool = True,
    answer_instruction: bool = True,
) -> dict:
    """Run one benchmark end to end; write `{benchmark}.json` and predictions; return the result."""
    spec = get_benchmark(benchmark)
    samples, data_path = load_samples(
        spec, Path(data) if data else None, Path(image_root) if image_root else None
    )
    if limit is not None:
        samples = samples[:limit]
    if not samples:
        raise ValueError(f"{data_path}: no {benchmark} samples to evaluate")
    logger.info(f"{benchmark}: {len(samples)} questions from {data_path}")
    model, processor = model_and_processor or load_model(model_dir, device, dtype)
    t0 = time.perf_counter()
    preds = predict(
        model, processor, samples, batch_size, max_new_tokens, template, progress, answer_instruction
    )
    seconds = time.perf_counter() - t0
    result, scores = score_predictions(spec, samples, preds, data_path)
    result.update(
        model=str(model_dir),
        data=str(data_path),
        generation={
            "greedy": True,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "template": template,
        },
        seconds=round(seconds, 2),
        questions_per_s=round(len(samples) / max(seconds, 1e-9), 2),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{benchmark}.json").write_text(json.dumps(result, indent=2) + "\n")
    with (out / f"{benchmark}_predictions.jsonl").open("w") as f:
        for s, p, sc in zip(samples, preds, scores):
            row = {"id": s.id, "image": str(s.image) if s.image else None, "question": s.question}
            row.update(choices=s.choices, answers=s.answers, prediction=p, score=sc, category=s.category)
            f.write(json.dumps(row) + "\n")
    logger.info(f"wrote {out / f'{benchmark}.json'} and {out / f'{benchmark}_predictions.jsonl'}")
    return result


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:6.1f}%"


def format_table(result: dict) -> str:
    """A plain-text table: overall and per-category accuracy, baselines and extra metrics."""
    base = result.get("baselines", {})
    cols = ["model"] + [k.replace("_", "-") for k in base]
    lines = [
        f"{result.get('benchmark', '')} (n = {result['n']})",
        f"{'':24}" + "".join(f"{c:>15}" for c in cols),
    ]

    def row(name: str, acc: float, n: int, cat: str | None) -> str:
        vals = [acc] + [
            (b if cat is None else b["per_category"].get(cat, {})).get("accuracy") for b in base.values()
        ]
        return f"{name + f' ({n})':24}" + "".join(f"{_pct(v):>15}" for v in vals)

    lines.append(row("overall", result["accuracy"], result["n"], None))
    for cat, r in result["per_category"].items():
        lines.append(row(f"  {cat}", r["accuracy"], r["n"], cat))
    extra = [
        k
        for k in (
            "question_accuracy",
            "pass_accuracy",
            "precision",
            "recall",
            "f1",
            "yes_ratio",
            "accuracy_2d",
            "accuracy_3d",
        )
        if result.get(k) is not None
    ]
    lines += [f"{k:24}{_pct(result[k]):>15}" for k in extra]
    # MME scores are points (acc + acc+ in percent per subtask), not fractions.
    if "total_score" in result:
        lines += [f"{'  ' + c + ' score':24}{r['score']:>15.1f}" for c, r in result["per_category"].items()]
        lines += [f"{k:24}{result[k]:>15.1f}" for k in ("perception_score", "cognition_score", "total_score")]
    if "majority" in base:
        lines.append(
            f"(majority answer: {base['majority']['answer']!r}; question-only = most common train answer)"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m eve.eval` argument parser."""
    p = argparse.ArgumentParser(prog="python -m eve.eval", description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, help="exported checkpoint directory (save_pretrained + processor)"
    )
    p.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    p.add_argument(
        "--data", default=None, help="benchmark file or folder (default: the embedded copy, if any)"
    )
    p.add_argument(
        "--image-root", default=None, help="folder holding the benchmark's images, if not beside it"
    )
    p.add_argument("--out", required=True, help="output folder for {benchmark}.json and predictions")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--template", default=None, help="chat template (default: the processor's, vicuna_v1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument(
        "--no-answer-instruction",
        action="store_true",
        help="leave out the answer-format line after each question, e.g. 'Answer the question using a "
        "single word or phrase.' (for a model fine-tuned without it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or info logs")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: evaluate, write the JSON, print the table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    result = evaluate(
        args.model,
        args.benchmark,
        args.out,
        data=args.data,
        image_root=args.image_root,
        batch_size=args.batch_size,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        template=args.template,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        answer_instruction=not args.no_answer_instruction,
    )
    print(format_table(result))
    return 0
