"""One self-contained HTML page about a demo run directory: what ran, curation, training, evaluation,
timings and configs, with every image embedded as a base64 data URI.

`make report` (= `python -m train.report --run-dir runs/demo [--out RUN/report.html]`); `make demo`
writes it as its last step. The training stages are the run's sub-folders holding a metrics.jsonl,
ordered as in train.demo's PIPELINES (EVE: stage1, stage2, sft; EVEv2: stage0 ... sft). A section
whose inputs are missing (a run without curation, an interrupted run) says so instead of failing.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eve.eval.runner import format_table
from train.demo import PIPELINES
from train.metrics import mean_tokens_per_s, read_metrics

CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
nav a { margin-right: 1em; }
section { border-top: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
td.num { text-align: right; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; }
.missing { color: #a33; font-style: italic; }
.example { display: flex; gap: 1em; align-items: flex-start; margin: 0.6em 0; }
.example img { width: 128px; image-rendering: pixelated; }
"""


@dataclass
class RunFiles:
    """What the report reads from one run directory; None (or empty) where a file is absent."""

    path: Path
    summary: dict | None
    """demo_summary.json: arch, seed, threads, step timings, the evaluation and the chat check."""
    timings: dict[str, float] | None
    """demo_timings.json (seconds per demo step), else the summary's copy."""
    stages: dict[str, list[dict] | str]
    """Stage name -> its metrics.jsonl rows, or why they could not be read; in pipeline order."""
    curation: dict | None
    """data/curated/report/report.json."""
    evals: dict[str, dict]
    """Benchmark -> eval/<benchmark>.json."""


def read_json(path: Path) -> Any:
    """The JSON in path, or None when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else None


def stage_order(found: set[str], arch: str | None) -> list[str]:
    """The found stage names in the order of the run's pipeline (the demo's --arch if recorded, else
    the pipeline naming most of them); names no pipeline has come last, alphabetically."""
    rows = PIPELINES.get(arch or "") or max(PIPELINES.values(), key=lambda r: sum(s.name in found for s in r))
    order = [row.name for row in rows]
    return sorted(found, key=lambda s: (order.index(s) if s in order else len(order), s))


def load_run(path: Path) -> RunFiles:
    """Read every input of the report that exists in run directory path."""
    summary = read_json(path / "demo_summary.json")
    timings = read_json(path / "demo_timings.json") or (summary or {}).get("timings_s")
    found = {p.parent.name for p in path.glob("*/metrics.jsonl")}
    stages: dict[str, list[dict] | str] = {}
    for name in stage_order(found, (summary or {}).get("arch")):
        try:
            stages[name] = read_metrics(path / name)
        except json.JSONDecodeError as e:  # a run killed mid-write leaves a cut last line
            stages[name] = f"{path / name / 'metrics.jsonl'} is not valid JSON lines ({e})"
    evals = {}
    for p in sorted((path / "eval").glob("*.json")):
        result = json.loads(p.read_text())
        if isinstance(result, dict) and "accuracy" in result and "n" in result:
            evals[p.stem] = result
    curation = read_json(path / "data" / "curated" / "report" / "report.json")
    return RunFiles(path, summary, timings, stages, curation, evals)


# ---- HTML pieces ----------------------------------------------------------------------------------


def esc(x: Any) -> str:
    """x as HTML-escaped text."""
    return html.escape(str(x))


def missing(text: str) -> str:
    """The note a section shows in place of inputs the run does not have."""
    return f'<p class="missing">{esc(text)}</p>'


def table(header: list[str] | None, rows: list[list[Any]]) -> str:
    """An HTML table (no header row for None); numbers right-aligned, floats with 4 significant digits."""

    def cell(v: Any) -> str:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="num">{esc(f"{v:.4g}" if isinstance(v, float) else v)}</td>'
        return f"<td>{esc(v)}</td>"

    head = "" if header is None else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def png_uri(data: bytes) -> str:
    """PNG bytes as a data URI."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_uri(path: Path, max_side: int = 1024) -> str:
    """An image file, shrunk to at most max_side pixels and re-encoded as PNG, as a data URI (so that
    whatever the file's format, the page holds a PNG every browser shows)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((max_side, max_side))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
    return png_uri(buf.getvalue())


def img_tag(uri: str, alt: str) -> str:
    """An <img> of a data URI."""
    return f'<img src="{uri}" alt="{esc(alt)}">'


def plot_stage(rows: list[dict], title: str) -> str:
    """One stage's CE and aligning loss (log scale) and its learning rate (second axis) per step,
    as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for key, label, colour in (
        ("ce_loss", "LM cross-entropy", "#4477aa"),
        ("align_loss", "patch aligning", "#ee6677"),
    ):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(steps, values, label=label, color=colour)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr = [r.get("lr") for r in rows]
    if any(v is not None for v in lr):
        ax2 = ax.twinx()
        ax2.plot(steps, lr, color="#999999", ls="--", lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return png_uri(buf.getvalue())


def total_seconds(timings: dict[str, float] | None) -> float | None:
    """The demo's total seconds: its "total", else (a demo still running) the sum of its steps."""
    if not timings:
        return None
    return timings.get("total", sum(v for k, v in timings.items() if k != "total"))


# ---- sections -------------------------------------------------------------------------------------


def summary_section(run: RunFiles) -> str:
    """What ran, when, with how many threads, in how long, and the final accuracy."""
    s = run.summary or {}
    items: list[tuple[str, str]] = [("run directory", str(run.path))]
    if run.summary is None:
        items.append(
            ("demo summary", "no demo_summary.json: the demo did not finish, or this is no demo run")
        )
    items.append(("architecture", s.get("arch", "not recorded")))
    if "align" in s:
        items.append(("patch aligning loss", "on" if s["align"] else "off (--no-align)"))
    if "seed" in s:
        items.append(("seed", str(s["seed"])))
    written = (run.curation or {}).get("counts", {}).get("written")
    items.append(("curation", "not run" if run.curation is None else f"{written} images written to shards"))
    stages = [
        f"{name} ({len(rows)} steps{'' if (run.path / name / 'export').is_dir() else ', no export'})"
        if isinstance(rows, list)
        else f"{name} (metrics unreadable)"
        for name, rows in run.stages.items()
    ]
    items.append(("training stages", ", ".join(stages) or "none"))
    first = next(iter(run.stages), None)
    started = read_json(run.path / first / "run.json") if first else None
    if started:
        items.append(("started", f"{started['started']} ({first}'s last start)"))
    for name in run.evals:
        written_at = time.localtime((run.path / "eval" / f"{name}.json").stat().st_mtime)
        items.append((f"{name} evaluated", time.strftime("%Y-%m-%d %H:%M:%S", written_at)))
    items.append(("threads (OMP_NUM_THREADS)", str(s.get("threads") or "not recorded")))
    total = total_seconds(run.timings)
    items.append(("total time", f"{total / 60:.1f} min" if total else "not recorded"))
    for name, result in run.evals.items():
        items.append((f"{name} accuracy", f"{100 * result['accuracy']:.1f}% on {result['n']} questions"))
    if not run.evals:
        items.append(("accuracy", "no evaluation in eval/"))
    return table(None, [list(kv) for kv in items])


def curation_section(run: RunFiles) -> str:
    """The curation report's counts per step, timings and cluster sizes, and its montages."""
    if run.curation is None:
        return missing("No curation report (data/curated/report/report.json): curation did not run here.")
    counts = run.curation.get("counts", {})
    parts = ["<h3>Images per step</h3>"]
    rows = [[k.replace("_", " "), v] for k, v in counts.items() if not isinstance(v, dict)]
    rows += [[f"written from {k}", v] for k, v in counts.get("by_source", {}).items()]
    parts.append(table(["count", "images"], rows))
    if run.curation.get("timings_s"):
        parts.append("<h3>Seconds per step</h3>")
        parts.append(
            table(["step", "seconds"], [[k, float(v)] for k, v in run.curation["timings_s"].items()])
        )
    if run.curation.get("cluster"):
        parts.append("<h3>Clusters</h3>")
        parts.append(table(None, [[k.replace("_", " "), v] for k, v in run.curation["cluster"].items()]))
    if run.curation.get("blind_pairs"):
        parts.append("<h3>CLIP-blind pairs</h3>")
        parts.append(table(None, [[k.replace("_", " "), v] for k, v in run.curation["blind_pairs"].items()]))
    curated = run.path / "data" / "curated"
    images = sorted((curated / "report").glob("*.png"))
    if (curated / "blind_pairs" / "montage.png").is_file() and not (
        curated / "report" / "blind_pairs.png"
    ).is_file():
        images.append(curated / "blind_pairs" / "montage.png")
    for path in images:
        parts.append(f"<h3>{esc(path.relative_to(curated))}</h3>{img_tag(image_uri(path), path.name)}")
    if not images:
        parts.append(missing("No montage or plot in data/curated/report/."))
    return "\n".join(parts)


def training_section(run: RunFiles) -> str:
    """Per stage: steps, mean tokens/s, final losses and a loss / learning-rate plot."""
    if not run.stages:
        return missing("No training stage: no sub-folder of the run holds a metrics.jsonl.")
    parts = []
    for name, rows in run.stages.items():
        parts.append(f'<h3 id="stage-{esc(name)}">{esc(name)}</h3>')
        if isinstance(rows, str):
            parts.append(missing(rows))
            continue
        if not rows:
            parts.append(
                missing(f"{name}/metrics.jsonl holds no step yet: the stage was stopped before logging.")
            )
            continue
        if not (run.path / name / "export").is_dir():
            parts.append(missing(f"{name} has no export: it has not finished."))
        last = rows[-1]
        facts = [
            ["steps logged", len(rows)],
            ["last step", last["step"]],
            ["mean tokens/s", mean_tokens_per_s(rows) or "-"],
            *([f"last {k}", last[k]] for k in ("ce_loss", "align_loss", "lr") if last.get(k) is not None),
        ]
        parts.append(table(None, facts))
        parts.append(img_tag(plot_stage(rows, name), f"{name} losses"))
    return "\n".join(parts)


def example_images(rows: list[dict], first: int = 3, wrong: int = 2) -> list[str]:
    """The first `first` images of the predictions, then the first `wrong` other images with a wrong answer."""
    order: list[str] = []
    for row in rows:
        if row["image"] not in order:
            order.append(row["image"])
    picked = order[:first]
    missed = [im for im in order[first:] if any(r["image"] == im and r["score"] < 1.0 for r in rows)]
    return picked + missed[:wrong]


def examples(path: Path) -> str:
    """A few test images with the questions asked about them, the model's answers and the references."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("image")]
    if not rows:
        return missing(f"{path.name} has no predictions with images.")
    parts = []
    for image in example_images(rows):
        qa = [
            [
                r["question"],
                r["prediction"],
                (r.get("answers") or ["-"])[0],
                "right" if r["score"] >= 1.0 else "wrong",
            ]
            for r in rows
            if r["image"] == image
        ]
        picture = (
            img_tag(image_uri(Path(image), max_side=256), Path(image).name)
            if Path(image).is_file()
            else missing(f"image not found: {image}")
        )
        parts.append(f'<div class="example">{picture}{table(["question", "model", "truth", ""], qa)}</div>')
    return "\n".join(parts)


def evaluation_section(run: RunFiles) -> str:
    """The accuracy table of each benchmark beside its baselines (eve.eval's table), a few answers with
    their images, and the demo's plain-question chat check."""
    if not run.evals:
        return missing("No evaluation result (eval/<benchmark>.json): the run stopped before evaluating.")
    parts = []
    for name, result in run.evals.items():
        parts.append(f"<h3>{esc(name)}</h3><pre>{esc(format_table(result))}</pre>")
        predictions = run.path / "eval" / f"{name}_predictions.jsonl"
        if predictions.is_file():
            parts.append(f"<h4>Example answers ({esc(predictions.name)})</h4>{examples(predictions)}")
        else:
            parts.append(missing(f"No {predictions.name}: no example answers."))
    check = (run.summary or {}).get("chat_check")
    if check:
        parts.append(
            f"<h3>Plain questions through python -m eve.chat: {check['right']} of {check['n']} right</h3>"
        )
        rows = [[a["image"], a["question"], a["answer"], a["truth"]] for a in check["answers"]]
        parts.append(table(["test image", "question", "answer", "truth"], rows))
    return "\n".join(parts)


def timings_section(run: RunFiles) -> str:
    """Seconds per demo step, tokens/s per training stage and the evaluation's questions/s."""
    parts = []
    steps = {k: v for k, v in (run.timings or {}).items() if k != "total"}
    if steps:
        steps["total"] = total_seconds(run.timings)
        rows = [[k, float(v), float(v) / 60] for k, v in steps.items()]
        parts.append(table(["step", "seconds", "minutes"], rows))
    else:
        parts.append(
            missing(
                "No step timings (demo_timings.json): the demo did not run a step itself in this directory."
            )
        )
    stage_rows = [
        [name, len(rows), mean_tokens_per_s(rows) or "-"]
        for name, rows in run.stages.items()
        if isinstance(rows, list)
    ]
    if stage_rows:
        parts.append("<h3>Training throughput</h3>")
        parts.append(table(["stage", "steps", "mean tokens/s"], stage_rows))
    eval_rows = [
        [name, r["seconds"], r["questions_per_s"]] for name, r in run.evals.items() if "seconds" in r
    ]
    if eval_rows:
        parts.append("<h3>Evaluation throughput</h3>")
        parts.append(table(["benchmark", "seconds", "questions/s"], eval_rows))
    return "\n".join(parts)


def configs_section(run: RunFiles) -> str:
    """Each stage's config.json (and the curation config), collapsed."""
    configs = [("curation", (run.curation or {}).get("config"))]
    configs += [(name, read_json(run.path / name / "config.json")) for name in run.stages]
    parts = [
        f"<details><summary>{esc(name)}</summary><pre>{esc(json.dumps(cfg, indent=1))}</pre></details>"
        for name, cfg in configs
        if cfg is not None
    ]
    return "\n".join(parts) or missing("No config.json in any stage folder and no curation report.")


SECTIONS: tuple[tuple[str, str, Callable[[RunFiles], str]], ...] = (
    ("summary", "Summary", summary_section),
    ("curation", "Curation", curation_section),
    ("training", "Training", training_section),
    ("evaluation", "Evaluation", evaluation_section),
    ("timings", "Timings and throughput", timings_section),
    ("configs", "Configs", configs_section),
)
"""The report's sections in page order: (HTML id, heading, builder)."""


def render(run: RunFiles) -> str:
    """The whole page."""
    nav = "".join(f'<a href="#{sid}">{esc(title)}</a>' for sid, title, _ in SECTIONS)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{esc(title)}</h2>\n{build(run)}\n</section>'
        for sid, title, build in SECTIONS
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>EVE run {esc(run.path.name)}</title><style>{CSS}</style></head>\n"
        f"<body><h1>EVE run {esc(run.path.name)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the HTML report of run_dir to out (default run_dir/report.html); the path written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"train.report: {run_dir} is not a directory; pass the --run-dir of a demo run")
    out = Path(out) if out is not None else run_dir / "report.html"
    out.write_text(render(load_run(run_dir)))
    return out


def main(argv: list[str] | None = None) -> None:
    """`python -m train.report --run-dir RUN [--out RUN/report.html]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo", help="the demo's run directory")
    parser.add_argument("--out", default=None, help="the HTML file to write (default: RUN/report.html)")
    args = parser.parse_args(argv)
    print(f"report: {write_report(args.run_dir, args.out)}")


if __name__ == "__main__":
    main()
