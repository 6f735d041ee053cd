"""The main job on the embedded default: curate -> stage 1 -> stage 2 -> SFT -> evaluate -> show answers.

`make demo` (= `python -m train.demo --run-dir runs/demo`) runs every step as its own process, with
the same commands a user would type (`make curate`, `make pretrain-stage1`, ...), so the demo
exercises exactly the shipped entry points and configs. A finished step (a complete export, with
its `export.json` marker, or the report) is skipped on a re-run, so an interrupted demo continues
where it stopped; `--force` deletes each step's output (curated shards, stage checkpoints and
exports, evaluation) and redoes it. `--no-align` trains without the patch-aligning loss (the ablation in docs/findings.md).
`--arch eve2` runs EVEv2's four stages (configs/tiny_eve2/) on the same data instead of EVE's three.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_curation.embedded import easy_vqa_attributes
from eve import chat
from eve.assets import easy_vqa_dir
from eve.console import setup_logging
from eve.eval.runner import format_table
from train.rundir import EXPORT_MARKER

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Step:
    """One demo step: a command line, the file whose existence means the step is done, and the folder
    it writes (what `--force` deletes: steps resume from what is on disk)."""

    name: str
    argv: list[str]
    done_marker: Path
    output: Path


@dataclass(frozen=True)
class StageRow:
    """One training stage of a demo pipeline: the step (and run sub-folder) name, its entry script in
    train/, its config and its data (curated caption shards or the SFT conversations)."""

    name: str
    script: str
    config: str
    data: str  # "shards" | "sft"


PIPELINES: dict[str, tuple[StageRow, ...]] = {
    # EVE v1: the paper's three stages (configs/tiny/).
    "eve": (
        StageRow("stage1", "pretrain_stage1.py", "configs/tiny/stage1.yaml", "shards"),
        StageRow("stage2", "pretrain_stage2.py", "configs/tiny/stage2.yaml", "shards"),
        StageRow("sft", "sft.py", "configs/tiny/sft.yaml", "sft"),
    ),
    # EVEv2: patch embedding alone, + visual layer copies, everything, SFT (configs/tiny_eve2/).
    "eve2": (
        StageRow("stage0", "eve2_stage0.py", "configs/tiny_eve2/stage0.yaml", "shards"),
        StageRow("stage1", "eve2_stage1.py", "configs/tiny_eve2/stage1.yaml", "shards"),
        StageRow("stage2", "pretrain_stage2.py", "configs/tiny_eve2/stage2.yaml", "shards"),
        StageRow("sft", "sft.py", "configs/tiny_eve2/sft.yaml", "sft"),
    ),
}
"""The demo's training stages per architecture (`--arch`); each stage starts from the previous export."""


def training_step(row: StageRow, previous: str | None, run: Path, extra: Sequence[str]) -> Step:
    """A training stage writing into run/<row.name>, reading the demo data of run/data and starting
    from run/<previous>/export (None: the config's own start, e.g. a random LLM)."""
    data = run / "data"
    argv = [
        sys.executable,
        str(REPO / "train" / row.script),
        "--config",
        str(REPO / row.config),
        "--train.output_dir",
        str(run / row.name),
        "--train.resume",
        "auto",
    ]
    if row.data == "shards":
        argv += ["--data.shards", json.dumps([str(data / "curated" / "shards" / "*.tar")])]
    else:
        argv += ["--data.json", str(data / "sft_easy_vqa.json"), "--data.image_root", str(data)]
    if previous is not None:
        argv += ["--model.init_path", str(run / previous / "export")]
    return Step(row.name, argv + list(extra), run / row.name / "export" / EXPORT_MARKER, run / row.name)


def curate_argv(data: Path, overrides: Sequence[str] = ()) -> list[str]:
    """`make curate` into `data` (embedded sources, curated shards, SFT JSON); overrides `key=value`."""
    return [
        sys.executable,
        "-m",
        "data_curation.run",
        "--config",
        str(REPO / "configs/curation/embedded.yaml"),
        "--out_dir",
        str(data / "curated"),
        "--embedded.dir",
        str(data),
        "--sources.0.path",
        str(data / "sources.jsonl"),
        *(f"--{kv}" for kv in overrides),
    ]


def demo_steps(
    run: Path,
    align: bool,
    eval_args: Sequence[str],
    curate_overrides: Sequence[str] = (),
    train_overrides: Sequence[str] = (),
    arch: str = "eve",
) -> list[Step]:
    """The steps of the demo, in order: curate, the training stages of PIPELINES[arch], evaluate
    (overrides: `section.key=value` for curation / every stage, passed on as `--section.key=value`, the
    syntax of both command lines)."""
    data = run / "data"
    curate = curate_argv(data, curate_overrides)
    stage_args = [] if align else ["--teachers", "[]"]
    stage_args += [f"--{kv}" for kv in train_overrides]
    rows = PIPELINES[arch]
    evaluate = [sys.executable, "-m", "eve.eval", "--model", str(run / rows[-1].name / "export")]
    evaluate += ["--benchmark", "easy_vqa", "--out", str(run / "eval"), *eval_args]
    previous = [None] + [row.name for row in rows[:-1]]
    return [
        Step("curate", curate, data / "curated" / "shards" / "manifest.jsonl", data / "curated"),
        *(training_step(row, prev, run, stage_args) for row, prev in zip(rows, previous)),
        Step("eval", evaluate, run / "eval" / "easy_vqa.json", run / "eval"),
    ]


def run_step(step: Step, log_dir: Path, env: dict | None = None, echo: bool = True) -> float:
    """Run one step, its output written to log_dir/name.log (and to stdout if `echo`); seconds taken.
    `env`: variables set for the step on top of this process's. Fails loudly with the log path."""
    log_path = log_dir / f"{step.name}.log"
    logger.info("== %s: %s", step.name, " ".join(step.argv))
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            step.argv,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env} if env else None,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo:
                sys.stdout.write(line)
        code = proc.wait()
    if code != 0:
        raise SystemExit(f"demo step {step.name!r} failed (exit {code}); its log is {log_path}")
    seconds = time.time() - t0
    if not echo:
        logger.info("== %s: done in %.1f min (log %s)", step.name, seconds / 60, log_path)
    return seconds


def run_steps(
    steps: Sequence[Step],
    log_dir: Path,
    timings_file: Path,
    force: bool = False,
    label: str = "",
    env: dict | None = None,
    echo: bool = True,
) -> dict:
    """Run each step that is not done yet (`force`: delete its output and redo it), logs in log_dir.

    Seconds per step are kept in `timings_file` as each step finishes, so that a run continued after
    an interruption still reports the steps an earlier invocation ran; returns them. `label` prefixes
    the step names in logs (e.g. a compared variant's name); `env` and `echo` go to `run_step`."""
    timings: dict[str, float] = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for step in steps:
        name = f"{label}{step.name}"
        if step.done_marker.exists() and not force:
            logger.info("== %s: done already (%s); --force redoes it", name, step.done_marker)
            continue
        if force and step.output.exists():
            logger.info("== %s: --force: deleting %s", name, step.output)
            if step.output.is_dir():
                shutil.rmtree(step.output)
            else:
                step.output.unlink()
        seconds = run_step(Step(name, step.argv, step.done_marker, step.output), log_dir, env, echo)
        timings[step.name] = round(seconds, 1)
        timings_file.write_text(json.dumps(timings, indent=1))
    return timings


def plot_losses(run: Path, out: Path, stages: Sequence[str]) -> None:
    """One PNG with the loss curves (CE and aligning) of the training stages side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 4))
    for ax, stage in zip(axes, stages):
        path = run / stage / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r["step"] for r in rows]
        for key, label in (("ce_loss", "LM cross-entropy"), ("align_loss", "patch aligning")):
            values = [r.get(key) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, values, label=label)
        ax.set_title(stage)
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def show_answers(run: Path, n_images: int = 3) -> str:
    """A few test images' questions with the model's answers and the references, as text."""
    rows = [json.loads(x) for x in (run / "eval" / "easy_vqa_predictions.jsonl").read_text().splitlines()]
    by_image: dict[str, list[dict]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row)
    lines = []
    for image in sorted(by_image, key=lambda p: int(Path(p).stem))[:n_images]:
        lines.append(f"{image}")
        for row in by_image[image]:
            mark = "ok " if row["score"] >= 1.0 else "   "
            lines.append(
                f"  {mark}Q: {row['question']:<45} model: {row['prediction']:<12} truth: {row['answers'][0]}"
            )
    return "\n".join(lines)


# Plain questions a newcomer might type, without the short-answer instruction the evaluation appends
CHAT_QUESTIONS = {"colour": "what is the color of the shape?", "shape": "what is the shape?"}


def chat_check(run: Path, n_images: int = 5) -> dict:
    """Ask the first test images plain questions through `python -m eve.chat` (in process) and score
    the answers against each image's colour and shape, read from its test answers."""
    test = easy_vqa_dir("test")
    attrs, _, _ = easy_vqa_attributes(test)
    rows = []
    for i in sorted(attrs)[:n_images]:
        truth = dict(zip(("colour", "shape"), attrs[i]))
        for kind, question in CHAT_QUESTIONS.items():
            argv = ["--model", str(run / "sft" / "export"), "--image", str(test / "images" / f"{i}.png")]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = chat.main(argv + ["--prompt", question, "--max-new-tokens", "8"])
            if code != 0:
                raise SystemExit(f"demo chat check: python -m eve.chat {' '.join(argv)} failed (exit {code})")
            answer = out.getvalue().strip()
            rows.append({"image": i, "question": question, "answer": answer, "truth": truth[kind]})
    right = sum(r["answer"].lower().strip(" .") == r["truth"] for r in rows)
    return {"n": len(rows), "right": right, "answers": rows}


def print_summary(summary: dict) -> None:
    """The accuracy by category beside the baselines, the chat check, and each step's time."""
    print("\n" + format_table(summary["easy_vqa"]))
    check = summary["chat_check"]
    print(f"\nplain questions through python -m eve.chat: {check['right']} of {check['n']} right")
    for r in check["answers"][:4]:
        print(f"  test image {r['image']}: {r['question']:<34} -> {r['answer']!r:<14} truth: {r['truth']}")
    timings = summary["timings_s"]
    print("\nstep      minutes" + "".join(f"\n{k:<9}{v / 60:8.1f}" for k, v in timings.items()))


def machine() -> str:
    """The CPU model and core count, for the runs table (timings mean little without them)."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def runs_table(runs: Sequence[Path]) -> str:
    """A markdown table of finished demo runs (their demo_summary.json): accuracy by category, minutes."""
    lines = [
        "| run | overall | colour | shape | yes/no | chat | minutes | machine | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        path = Path(run) / "demo_summary.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: is {run} a finished `python -m train.demo` run?")
        summary = json.loads(path.read_text())
        result = summary["easy_vqa"]
        cats = [result["per_category"].get(c, {}).get("accuracy") for c in ("colour", "shape", "yes/no")]
        pct = " | ".join(f"{100 * a:.1f}%" if a is not None else "" for a in [result["accuracy"], *cats])
        check = summary.get("chat_check", {})
        chat = f"{check.get('right', '')}/{check.get('n', '')}"
        minutes = summary["timings_s"].get("total", 0.0) / 60
        threads = summary.get("threads") or "default"
        command = summary.get("command", "")
        lines.append(
            f"| {Path(run).name} (seed {summary['seed']}, {threads} threads) | {pct} | {chat} | "
            f"{minutes:.1f} | {summary.get('machine', '')} | `{command}` |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """`python -m train.demo [--run-dir runs/demo] [--no-align] [--force]`."""
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo", help="where everything is written")
    parser.add_argument(
        "--arch", default="eve", choices=sorted(PIPELINES), help="EVE v1's three stages or EVEv2's four"
    )
    parser.add_argument("--no-align", action="store_true", help="train without the patch-aligning loss")
    parser.add_argument("--force", action="store_true", help="delete the steps' outputs and redo them")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N questions")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the curation (SFT order, caption checks) and of every stage (default: the configs' 0)",
    )
    parser.add_argument(
        "--curate-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="curation setting, e.g. scan.max_images=64 (repeatable)",
    )
    parser.add_argument(
        "--train-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="setting for all three stages, e.g. train.max_steps=2 (repeatable)",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="RUN",
        help="print a markdown table of these finished runs (their demo_summary.json) and exit",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(runs_table([Path(r) for r in args.table]))
        return

    run = Path(args.run_dir).resolve()
    log_dir = run / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    eval_args = ["--batch-size", "64"] + (
        [] if args.eval_limit is None else ["--limit", str(args.eval_limit)]
    )

    seeded = ([], []) if args.seed is None else ([f"seed={args.seed}"], [f"train.seed={args.seed}"])
    steps = demo_steps(
        run,
        not args.no_align,
        eval_args,
        seeded[0] + args.curate_override,
        seeded[1] + args.train_override,
        args.arch,
    )
    timings = run_steps(steps, log_dir, run / "demo_timings.json", args.force)
    timings.pop("total", None)
    timings["total"] = round(sum(timings.get(s.name, 0.0) for s in steps), 1)

    plot_losses(run, run / "loss_curves.png", [row.name for row in PIPELINES[args.arch]])
    result = json.loads((run / "eval" / "easy_vqa.json").read_text())
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={threads}"] if threads else []  # the command as run, to redo it
    summary = {
        "seed": args.seed or 0,
        "threads": threads,
        "timings_s": timings,
        "easy_vqa": result,
        "chat_check": chat_check(run),
        "align": not args.no_align,
        "arch": args.arch,
        "machine": machine(),
        "command": " ".join([*prefix, "python -m train.demo", *(argv if argv is not None else sys.argv[1:])]),
    }
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print("\n" + show_answers(run))
    print_summary(summary)
    print(f"\neasy-vqa test accuracy: {100 * result['accuracy']:.1f}% on {result['n']} questions")
    print(f"loss curves: {run / 'loss_curves.png'}; summary: {run / 'demo_summary.json'}")
    from train.report import write_report  # imported here: train.report reads this module's PIPELINES

    print(f"report: {write_report(run)}")


if __name__ == "__main__":
    main()
