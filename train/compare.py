"""`make compare`: encoder-free vs encoder-based models on identical data, LLM and schedule.

    python -m train.compare [--run-dir runs/compare] [--variants eve,llava] [--quick] [--force]

Every variant is one row of VARIANTS (a model preset, its front-end settings and its teachers) and
goes through the same two stages with the same data, random tiny LLM, seed, steps and learning rates:

1. pre-training on the curated caption shards (`make curate`; the demo's data), everything trains
   but the pretrained encoders and the teacher: the encoder-free variants through stage 1's table row
   (patch embedding, projector, aligning heads) plus the LLM (and EVEv2's image copies of its
   layers), the encoder-based ones through the `align` row (the connector) plus the LLM;
2. SFT on the easy-vqa conversations (everything but the encoders and the teacher trains);

then greedy answers to the first `--eval-limit` easy-vqa test questions. Each step is a separate
process running the shipped entry points (train/pretrain_stage1.py, train/align.py, train/sft.py,
`python -m eve.eval`); a finished step is skipped on a re-run (`--force` redoes it). It writes
`compare.json`, `compare.md` (the table) and `compare.png` (accuracy vs training cost) in the run
directory. With the 7B presets and real weights the same stages run on a GPU cluster from YAML configs
(docs/compare.md).

On CPU the embedded efficientnet-lite0 (real ImageNet weights) is the only pretrained encoder that
installs from the package registry; the two-encoder connectors pair its stride-16 map at 128 px with
its stride-32 map at 256 px (both 8 x 8), standing in for CLIP + DINOv2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from eve.console import setup_logging
from train.compare_configs import run_compare_config
from train.demo import REPO, Step, curate_argv, run_step, run_steps
from train.metrics import mean_tokens_per_s, read_metrics
from train.rundir import EXPORT_MARKER

logger = logging.getLogger(__name__)

# The embedded teacher (as in configs/tiny/stage1.yaml) and its two-level form (stage1_multilevel.yaml)
TEACHER = {"backend": "timm", "name": "efficientnet_lite0", "image_size": 128, "bf16": True}
ONE_LEVEL = [{**TEACHER, "layer": -2, "loss_weight": 1.0}]
TWO_LEVELS = [{**TEACHER, "levels": [{"layer": -3, "loss_weight": 1.0}, {"layer": -2, "loss_weight": 1.0}]}]


@dataclass(frozen=True)
class Variant:
    """One compared model: a preset, front-end overrides and teachers (empty: no aligning loss)."""

    title: str
    preset: str
    teachers: list = field(default_factory=list)
    connector: dict | None = None
    """`vision_connector` of an encoder preset (None: the preset's own)."""

    @property
    def encoder_free(self) -> bool:
        return not self.preset.startswith("tiny-encoders")


VARIANTS: dict[str, Variant] = {
    "eve": Variant("EVE: patch embedding, aligning loss (one teacher level)", "tiny", ONE_LEVEL),
    "eve-multilevel": Variant("EVE, aligning to a shallow and a deep teacher level", "tiny", TWO_LEVELS),
    "eve-noalign": Variant("EVE without the aligning loss", "tiny"),
    "eve2": Variant(
        "EVEv2: its patch embedding, image copies of every layer (Qwen2), no aligning", "tiny-eve2"
    ),
    "llava": Variant("LLaVA-1.5: encoder + mlp2x_gelu", "tiny-encoders"),
    "mof-interleaved": Variant("MoF: two encoders, tokens interleaved", "tiny-encoders-mof"),
    "mof-additive": Variant(
        "MoF: two encoders, weighted sum", "tiny-encoders-mof", connector={"connector": "mof_additive"}
    ),
    "comm": Variant(
        "COMM: LLN-Layerscale merging, MLP on the second encoder",
        "tiny-encoders-mof",
        connector={"connector": "comm", "comm_merge": "lln_layerscale"},
    ),
    "sva": Variant(
        "Cambrian SVA: 8x8 query grid over both encoders",
        "tiny-encoders-mof",
        connector={
            "connector": "sva",
            "sva_width": 128,
            "sva_heads": 4,
            "sva_depth": 2,
            "sva_query_grid": [8, 8],
        },
    ),
    "pargo": Variant(
        "ParGo: 32 partial + 4 global queries",
        "tiny-encoders",
        connector={
            "connector": "pargo",
            "pargo_partial": 32,
            "pargo_global": 4,
            "pargo_width": 128,
            "pargo_heads": 4,
            "pargo_ffn": 256,
            "pargo_layers": 2,
        },
    ),
}
QUICK = ("eve", "llava", "mof-interleaved")


@dataclass(frozen=True)
class Schedule:
    """What every variant gets (identical across variants)."""

    pretrain_steps: int = 120
    sft_steps: int = 160
    batch_size: int = 32
    lr: float = 1e-3
    eval_limit: int = 1000
    seed: int = 0


def variant_steps(name: str, variant: Variant, run: Path, data: Path, sched: Schedule) -> list[Step]:
    """The pre-training, SFT and evaluation steps of one variant, as command lines."""
    out = run / name
    common = [
        f"--train.global_batch_size={sched.batch_size}",
        f"--train.micro_batch_size={sched.batch_size}",
        f"--train.seed={sched.seed}",
        f"--optim.lr={sched.lr}",
        "--train.save_every=0",
        "--train.resume=auto",
        f"--teachers={json.dumps(variant.teachers)}",
        "--optim.unfrozen=" + json.dumps(["llm", "visual"]),
    ]
    model = [f"--model.preset={variant.preset}"]
    if variant.connector is not None:
        model.append("--model.overrides=" + json.dumps({"vision_connector": variant.connector}))
    first, script = ("stage1", "pretrain_stage1.py") if variant.encoder_free else ("align", "align.py")
    pretrain = [
        sys.executable,
        str(REPO / "train" / script),
        "--config",
        str(REPO / "configs/tiny/stage1.yaml"),
        f"--stage.name={first}",
        f"--train.output_dir={out / 'pretrain'}",
        f"--train.max_steps={sched.pretrain_steps}",
        "--data.shards=" + json.dumps([str(data / "curated" / "shards" / "*.tar")]),
        *model,
        *common,
    ]
    sft = [
        sys.executable,
        str(REPO / "train" / "sft.py"),
        "--config",
        str(REPO / "configs/tiny/sft.yaml"),
        f"--train.output_dir={out / 'sft'}",
        f"--train.max_steps={sched.sft_steps}",
        f"--data.json={data / 'sft_easy_vqa.json'}",
        f"--data.image_root={data}",
        f"--model.init_path={out / 'pretrain' / 'export'}",
        "--optim.frozen=[]",
        "--optim.frozen_llm_layers=0",
        *common,
    ]
    evaluate = [sys.executable, "-m", "eve.eval", "--model", str(out / "sft" / "export")]
    evaluate += ["--benchmark", "easy_vqa", "--out", str(out / "eval"), "--batch-size", "64"]
    evaluate += ["--limit", str(sched.eval_limit)]
    return [
        Step("pretrain", pretrain, out / "pretrain" / "export" / EXPORT_MARKER, out / "pretrain"),
        Step("sft", sft, out / "sft" / "export" / EXPORT_MARKER, out / "sft"),
        Step("eval", evaluate, out / "eval" / "easy_vqa.json", out / "eval"),
    ]


def model_facts(export: Path) -> dict:
    """Parameters (total, trained in SFT = all but the frozen encoders) and image tokens of a 64-px
    easy-vqa image (counted in what the export's processor makes of one)."""
    from eve.assets import easy_vqa_dir
    from eve.image_processing_eve import load_image
    from eve.inference import load_model

    model, processor = load_model(export, "cpu", "float32")
    total = sum(p.numel() for p in model.parameters())
    encoders = getattr(model.vision_tower, "encoders", None)
    frozen = sum(p.numel() for p in encoders.parameters()) if encoders is not None else 0
    turns = [{"from": "human", "value": "<image>\nwhat shape is this?"}, {"from": "gpt", "value": "circle"}]
    sample = processor.encode(turns, load_image(easy_vqa_dir("test") / "images" / "0.png"))
    image_tokens = sum(int(t) == processor.image_token_index for t in sample["input_ids"])
    return {"params_total": total, "params_trained": total - frozen, "image_tokens": image_tokens}


def summarize(name: str, variant: Variant, out: Path) -> dict:
    """One table row from a finished variant's files (wall time: its steps' `timings.json`)."""
    result = json.loads((out / "eval" / "easy_vqa.json").read_text())
    row = {
        "variant": name,
        "title": variant.title,
        "encoder_free": variant.encoder_free,
        "accuracy": result["accuracy"],
        "n": result["n"],
        **{cat: r["accuracy"] for cat, r in result["per_category"].items()},
        **model_facts(out / "sft" / "export"),
        "pretrain_tokens_per_s": mean_tokens_per_s(read_metrics(out / "pretrain")),
        "sft_tokens_per_s": mean_tokens_per_s(read_metrics(out / "sft")),
    }
    timings = out / "timings.json"
    row["wall_s"] = round(sum(json.loads(timings.read_text()).values()), 1) if timings.is_file() else None
    return row


def _pct(row: dict, key: str) -> str:
    return f"{100 * row[key]:.1f}%" if row.get(key) is not None else "-"


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table."""
    head = "| variant | front-end | overall | colour | shape | yes/no | image tokens | trained / total params | tokens/s (pretrain, SFT) | wall |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        tps = " / ".join(
            f"{r[k]:,.0f}" if r[k] else "-" for k in ("pretrain_tokens_per_s", "sft_tokens_per_s")
        )
        lines.append(
            f"| {r['variant']} | {'encoder-free' if r['encoder_free'] else 'encoders'} | {_pct(r, 'accuracy')} "
            f"| {_pct(r, 'colour')} | {_pct(r, 'shape')} | {_pct(r, 'yes/no')} | {r['image_tokens']} "
            f"| {r['params_trained'] / 1e6:.2f}M / {r['params_total'] / 1e6:.2f}M | {tps} "
            f"| {'-' if r['wall_s'] is None else format(r['wall_s'] / 60, '.1f') + ' min'} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy per question kind, one group of bars per variant (encoder-free ones hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = ["accuracy", "colour", "shape", "yes/no"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    width = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        xs = [i + (k - 1.5) * width for i in range(len(rows))]
        ys = [100 * (r.get(kind) or 0) for r in rows]
        bars = ax.bar(xs, ys, width, label="overall" if kind == "accuracy" else kind)
        for bar, r in zip(bars, rows):
            bar.set_hatch("//" if r["encoder_free"] else "")
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20)
    ax.set_ylabel(f"easy-vqa accuracy (%), first {rows[0]['n']} test questions")
    ax.set_title("identical data and schedule (hatched: encoder-free)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ensure_data(run: Path, given: str | None, curate_overrides: list[str]) -> Path:
    """The demo's curated data (shards + SFT JSON): `given`, else runs/demo/data if `make curate` wrote
    it, else curated into the run directory."""
    candidates = [Path(given)] if given else [REPO / "runs/demo/data", run / "data"]
    for data in candidates:
        if (data / "curated/shards/manifest.jsonl").is_file() and (data / "sft_easy_vqa.json").is_file():
            return data
    if given:
        raise SystemExit(
            f"--data {given}: no curated/shards/manifest.jsonl and sft_easy_vqa.json (run `make curate`)"
        )
    data = run / "data"
    curate = curate_argv(data, curate_overrides)
    run_step(Step("curate", curate, data / "curated/shards/manifest.jsonl", data / "curated"), run / "logs")
    return data


def default_jobs(cores: int) -> int:
    """Variants at once: one per core. A one-thread step of the tiny model keeps its core busier than
    a two-thread step keeps two: two one-thread variants side by side on two cores finish in 1.47x the
    time of one two-thread variant alone, 1.36x the throughput (docs/compare.md)."""
    return max(1, cores)


def run_variants(
    names: list[str], run: Path, data: Path, sched: Schedule, force: bool, jobs: int | None
) -> None:
    """Train and evaluate each variant, `jobs` of them at once (each variant's steps in order).

    With several jobs each step gets OMP_NUM_THREADS = cores // jobs (unless it is set already) and
    its output goes only to its log; a failed variant stops no other, and the command fails at the
    end naming every failed variant and its log."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = min(jobs or default_jobs(cores), len(names))
    if jobs < 1:
        raise SystemExit(f"--jobs {jobs}: give at least 1")
    env = None
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env = {"OMP_NUM_THREADS": str(max(1, cores // jobs))}
    logger.info(
        "%d variants, %d at a time on %d cores (%s)", len(names), jobs, cores, env or "threads as set"
    )

    def one(name: str) -> None:
        steps = variant_steps(name, VARIANTS[name], run, data, sched)
        run_steps(steps, run / "logs", run / name / "timings.json", force, f"{name}.", env, echo=jobs == 1)

    if jobs == 1:
        for name in names:
            one(name)
        return
    failed = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(one, name): name for name in names}
        for future in as_completed(futures):
            try:
                future.result()
            except BaseException as e:  # SystemExit from a failed step: keep the other variants going
                failed[futures[future]] = str(e)
    if failed:
        raise SystemExit("variants failed: " + "; ".join(f"{n}: {why}" for n, why in failed.items()))


def main(argv: list[str] | None = None) -> list[dict]:
    """`python -m train.compare`: train, evaluate and tabulate the chosen variants; returns the rows."""
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/compare")
    parser.add_argument("--variants", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--force", action="store_true", help="redo finished steps")
    parser.add_argument("--pretrain-steps", type=int, default=Schedule.pretrain_steps)
    parser.add_argument("--sft-steps", type=int, default=Schedule.sft_steps)
    parser.add_argument("--batch-size", type=int, default=Schedule.batch_size)
    parser.add_argument("--eval-limit", type=int, default=Schedule.eval_limit)
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="variants trained at once, each with cores/jobs threads (default: one per core); "
        "the table's figures then come from one-thread steps, whose bf16 rounding differs from two",
    )
    parser.add_argument("--data", default=None, help="curated demo data folder (default: runs/demo/data)")
    parser.add_argument("--curate-override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--config",
        default=None,
        help="a compare YAML (e.g. configs/compare/7b.yaml): its variants' stage configs, data and "
        "benchmarks instead of the embedded tiny comparison (train/compare_configs.py)",
    )
    args = parser.parse_args(argv)
    if args.config:
        names = [n.strip() for n in args.variants.split(",") if n.strip()] if args.variants else None
        return run_compare_config(args.config, names, args.force)
    names = list(QUICK) if args.quick else list(VARIANTS)
    if args.variants:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    sched = Schedule(args.pretrain_steps, args.sft_steps, args.batch_size, eval_limit=args.eval_limit)
    run = Path(args.run_dir).resolve()
    (run / "logs").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    data = ensure_data(run, args.data, args.curate_override)

    run_variants(names, run, data, sched, args.force, args.jobs)
    rows = [summarize(name, VARIANTS[name], run / name) for name in names]

    (run / "compare.json").write_text(json.dumps({"schedule": sched.__dict__, "rows": rows}, indent=2))
    table = markdown_table(rows)
    (run / "compare.md").write_text(table + "\n")
    plot(rows, run / "compare.png")
    print("\n" + table)
    print(f"\ntable: {run / 'compare.md'}; plot: {run / 'compare.png'}; data: {run / 'compare.json'}")
    return rows


if __name__ == "__main__":
    main()
