"""`python -m train.compare --config configs/compare/7b.yaml`: the comparison from YAML, at any scale.

The embedded comparison (`make compare`) builds its variants from presets and one tiny schedule. At
7B the variants are the shipped stage configs (configs/eve7b/, configs/llava15_7b/, ...) run one
after the other, each stage starting from the previous stage's export, on data given once for all
variants, then evaluated on the same benchmarks. A compare YAML holds:

    run_dir: runs/compare_7b
    launcher: [deepspeed, --num_gpus, "8"]      # what runs each train/*.py (default: this python)
    data:                                       # identical for every variant
      shards: [/data/captions/*.tar]            # every pre-training stage
      sft_json: /data/llava_v1_5_mix665k.json   # every SFT stage
      sft_image_root: /data/llava_images
    evaluation:                                 # python -m eve.eval on each final export
      - {benchmark: mmvp, data: /data/MMVP}
      - {benchmark: pope, data: /data/pope, args: [--batch-size, "32"]}
    variants:
      eve:
        stages:
          - {name: stage1, script: pretrain_stage1.py, config: configs/eve7b/stage1.yaml, data: shards}
          - {name: sft, script: sft.py, config: configs/eve7b/sft.yaml, data: sft, args: [...]}
        args: []                                # added to every stage of this variant

A finished stage (its export marker) or evaluation is reused on a re-run, as in `make compare`.
Writes `compare.md` and `compare.json` in `run_dir`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from train.demo import REPO, StageRow, Step, run_steps
from train.rundir import EXPORT_MARKER

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConfigVariant:
    """One compared model: its stages in order and the arguments added to each of them."""

    name: str
    stages: tuple[StageRow, ...]
    args: tuple[str, ...] = ()
    """Added to every stage."""
    stage_args: tuple[tuple[str, ...], ...] = ()
    """Added to one stage each (same order as `stages`)."""


@dataclass(frozen=True)
class CompareConfig:
    """A compare YAML (see the module docstring)."""

    path: Path
    run_dir: Path
    launcher: tuple[str, ...]
    data: dict
    evaluation: tuple[dict, ...]
    variants: tuple[ConfigVariant, ...] = field(default_factory=tuple)


def _fail(path: Path, message: str) -> None:
    raise SystemExit(f"{path}: {message}")


def load_compare_config(path: str | Path) -> CompareConfig:
    """Read and check a compare YAML; every error names the file and the key."""
    path = Path(path)
    if not path.is_file():
        _fail(path, "no such compare config (see configs/compare/7b.yaml for the layout)")
    tree = yaml.safe_load(path.read_text()) or {}
    unknown = set(tree) - {"run_dir", "launcher", "data", "evaluation", "variants"}
    if unknown:
        _fail(path, f"unknown keys {sorted(unknown)}; expected run_dir, launcher, data, evaluation, variants")
    data = tree.get("data") or {}
    bad = set(data) - {"shards", "sft_json", "sft_image_root"}
    if bad:
        _fail(path, f"data: unknown keys {sorted(bad)}; expected shards, sft_json, sft_image_root")
    variants = []
    for name, spec in (tree.get("variants") or {}).items():
        rows, stage_args = [], []
        for i, stage in enumerate((spec or {}).get("stages") or []):
            missing = {"name", "script", "config", "data"} - set(stage)
            if missing:
                _fail(path, f"variants.{name}.stages[{i}]: missing {sorted(missing)}")
            if stage["data"] not in ("shards", "sft"):
                _fail(path, f"variants.{name}.stages[{i}].data must be shards or sft, not {stage['data']!r}")
            if not (REPO / "train" / stage["script"]).is_file():
                _fail(path, f"variants.{name}.stages[{i}].script: no train/{stage['script']}")
            rows.append(StageRow(stage["name"], stage["script"], stage["config"], stage["data"]))
            stage_args.append(tuple(str(a) for a in stage.get("args") or ()))
        if not rows:
            _fail(path, f"variants.{name}: no stages")
        common = tuple(str(a) for a in spec.get("args") or ())
        variants.append(ConfigVariant(name, tuple(rows), common, tuple(stage_args)))
    if not variants:
        _fail(path, "no variants")
    needs = {row.data for v in variants for row in v.stages}
    if "shards" in needs and not data.get("shards"):
        _fail(path, "data.shards: pre-training stages need the caption shards")
    if "sft" in needs and not (data.get("sft_json") and data.get("sft_image_root")):
        _fail(path, "data.sft_json and data.sft_image_root: SFT stages need the conversations and images")
    evaluation = tuple(tree.get("evaluation") or ())
    for i, entry in enumerate(evaluation):
        if "benchmark" not in entry:
            _fail(path, f"evaluation[{i}]: missing benchmark")
    launcher = tree.get("launcher") or [sys.executable]
    launcher = launcher.split() if isinstance(launcher, str) else [str(a) for a in launcher]
    run_dir = Path(tree.get("run_dir") or "runs/compare_configs")
    return CompareConfig(path, run_dir, tuple(launcher), data, evaluation, tuple(variants))


def data_args(row: StageRow, data: dict) -> list[str]:
    """The command-line data of a stage: the same shards or conversations for every variant."""
    if row.data == "shards":
        return [
            "--data.shards",
            json.dumps(data["shards"]),
            "--data.json",
            "null",
            "--data.image_root",
            "null",
        ]
    return [
        "--data.json",
        data["sft_json"],
        "--data.image_root",
        data["sft_image_root"],
        "--data.shards",
        "[]",
    ]


def variant_steps(config: CompareConfig, variant: ConfigVariant) -> list[Step]:
    """Each stage of the variant (from the previous stage's export), then each evaluation."""
    out = config.run_dir / variant.name
    steps, previous = [], None
    for row, own in zip(variant.stages, variant.stage_args):
        argv = [*config.launcher, str(REPO / "train" / row.script), "--config", str(REPO / row.config)]
        argv += ["--train.output_dir", str(out / row.name), "--train.resume", "auto"]
        argv += data_args(row, config.data)
        if previous is not None:
            argv += ["--model.init_path", str(out / previous / "export")]
        steps.append(
            Step(
                row.name,
                [*argv, *variant.args, *own],
                out / row.name / "export" / EXPORT_MARKER,
                out / row.name,
            )
        )
        previous = row.name
    export = out / previous / "export"
    for entry in config.evaluation:
        bench = entry["benchmark"]
        argv = [sys.executable, "-m", "eve.eval", "--model", str(export), "--benchmark", bench]
        argv += ["--out", str(out / "eval")]
        if entry.get("data"):
            argv += ["--data", str(entry["data"])]
        argv += [str(a) for a in entry.get("args") or ()]
        steps.append(
            Step(f"eval-{bench}", argv, out / "eval" / f"{bench}.json", out / "eval" / f"{bench}.json")
        )
    return steps


def summarize(config: CompareConfig, variant: ConfigVariant) -> dict:
    """One row: each benchmark's accuracy, the final export's front-end and size, the wall time."""
    from safetensors import safe_open

    out = config.run_dir / variant.name
    export = out / variant.stages[-1].name / "export"
    model_config = json.loads((export / "config.json").read_text())
    params = 0
    for weights in export.glob("model*.safetensors"):
        with safe_open(str(weights), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    row = {"variant": variant.name, "frontend": model_config.get("vision_frontend", "pel"), "params": params}
    for entry in config.evaluation:
        result = json.loads((out / "eval" / f"{entry['benchmark']}.json").read_text())
        row[entry["benchmark"]] = result.get("accuracy")
    timings = out / "timings.json"
    row["wall_s"] = round(sum(json.loads(timings.read_text()).values()), 1) if timings.is_file() else None
    return row


def markdown_table(config: CompareConfig, rows: list[dict]) -> str:
    benches = [e["benchmark"] for e in config.evaluation]
    lines = ["| variant | front-end | " + " | ".join(benches) + " | params | wall |"]
    lines.append("|" + "---|" * (4 + len(benches)))
    for r in rows:
        scores = " | ".join("-" if r.get(b) is None else f"{100 * r[b]:.1f}%" for b in benches)
        wall = "-" if r["wall_s"] is None else f"{r['wall_s'] / 3600:.1f} h"
        lines.append(f"| {r['variant']} | {r['frontend']} | {scores} | {r['params'] / 1e9:.2f}B | {wall} |")
    return "\n".join(lines)


def run_compare_config(path: str | Path, names: list[str] | None = None, force: bool = False) -> list[dict]:
    """Run (or reuse) every stage and evaluation of the chosen variants; write and return the table rows."""
    config = load_compare_config(path)
    known = {v.name: v for v in config.variants}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; {config.path} has {', '.join(known)}")
    chosen = [known[n] for n in names] if names else list(config.variants)
    config = dataclasses.replace(config, run_dir=config.run_dir.resolve())
    run = config.run_dir
    (run / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in chosen:
        steps = variant_steps(config, variant)
        run_steps(steps, run / "logs", run / variant.name / "timings.json", force, label=f"{variant.name}.")
        rows.append(summarize(config, variant))
    (run / "compare.json").write_text(json.dumps({"config": str(config.path), "rows": rows}, indent=2))
    table = markdown_table(config, rows)
    (run / "compare.md").write_text(table + "\n")
    print("\n" + table)
    return rows
