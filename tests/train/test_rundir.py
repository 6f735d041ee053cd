"""Run directories: one run per directory, resumed settings checked, exports whole or absent, kills anywhere."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.synthetic import (
    losses,
    stage1_config_file,
    tiny_run_config,
    write_llava_json,
    write_yaml,
)
from train.build import lr_lambda
from train.checkpointing import list_checkpoints, read_meta
from train.cli import run_stage
from train.metrics import read_metrics
from train.rundir import EXPORT_MARKER, RunDirError, config_changes, is_complete_export

REPO = Path(__file__).resolve().parents[2]


def config_file(tmp_path: Path, name: str, **train) -> str:
    return stage1_config_file(tmp_path, name, **{"max_steps": 6, **train})


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run: its losses and its exported weights."""
    tmp = tmp_path_factory.mktemp("reference")
    export = run_stage("stage1", ["--config", config_file(tmp, "ref")])
    return losses(tmp / "ref"), load_file(str(export / "model.safetensors"))


def test_fresh_run_into_a_directory_holding_another_run_is_refused(tmp_path, reference):
    cfg = config_file(tmp_path, "run")
    run_stage("stage1", ["--config", cfg])
    before = snapshot(tmp_path / "run")
    with pytest.raises(RunDirError, match="holds another run.*--resume.*--train.overwrite"):
        run_stage("stage1", ["--config", cfg, "--train.resume", "null", "--train.seed", "1"])
    assert snapshot(tmp_path / "run") == before  # nothing deleted, emptied or rewritten
    # Asked explicitly, the new run replaces the old one; a later --resume continues the new run.
    run_stage(
        "stage1",
        ["--config", cfg, "--train.resume", "null", "--train.seed", "1", "--train.overwrite", "true"],
    )
    new_id = json.loads((tmp_path / "run" / "run.json").read_text())["run_id"]
    assert all(read_meta(p)["run_id"] == new_id for p in list_checkpoints(tmp_path / "run"))
    assert losses(tmp_path / "run") != reference[0] and len(losses(tmp_path / "run")) == 6
    assert json.loads((tmp_path / "run" / "export" / EXPORT_MARKER).read_text())["run_id"] == new_id


def test_a_run_directory_without_work_can_be_reused(tmp_path):
    # A run that failed before its first step leaves only run.json and config.json: not work to protect.
    cfg = config_file(tmp_path, "run", max_steps=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"run_id": "crashed"}')
    (tmp_path / "run" / "config.json").write_text("{}")
    assert is_complete_export(run_stage("stage1", ["--config", cfg, "--train.resume", "null"]))


def test_changed_settings_on_resume_are_refused_or_applied_deliberately(tmp_path, reference):
    cfg = config_file(tmp_path, "run")
    run_stage("stage1", ["--config", cfg, "--train.stop_after", "3"])  # last checkpoint: step 2
    with pytest.raises(RunDirError, match=r"optim\.lr: 0\.001 -> 0\.0001") as err:
        run_stage(
            "stage1", ["--config", cfg, "--resume", "--optim.lr", "1e-4", "--optim.weight_decay", "0.1"]
        )
    assert "optim.weight_decay: 0.0 -> 0.1" in str(err.value)
    # Settings that only change the length, logging or saving apply without a flag.
    run_stage("stage1", ["--config", cfg, "--resume", "--train.stop_after", "4", "--train.log_every", "2"])
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 4]  # step 3 redone, not logged
    # With the flag the new LR applies from the resumed step: step 5 uses 1e-4 x the schedule at step 4.
    run_stage(
        "stage1", ["--config", cfg, "--resume", "--optim.lr", "1e-4", "--train.allow_config_change", "true"]
    )
    lr = {r["step"]: r["lr"] for r in read_metrics(tmp_path / "run")}
    schedule = lr_lambda(6, 0.1, "cosine", 0.0)  # tiny_run_config: warm-up ratio 0.1, cosine to 0
    assert lr[4] == pytest.approx(1e-3 * schedule(3), rel=1e-12)  # before the change: the old peak LR
    assert lr[5] == pytest.approx(1e-4 * schedule(4), rel=1e-12)
    assert lr[6] == pytest.approx(1e-4 * schedule(5), rel=1e-12)


def test_config_changes_lists_only_settings_that_break_exactness():
    saved = {"optim": {"lr": 1e-3}, "train": {"max_steps": 4, "save_every": 2}, "teachers": [{"layer": -2}]}
    current = {"optim": {"lr": 1e-3}, "train": {"max_steps": 8, "save_every": 0}, "teachers": [{"layer": -1}]}
    assert config_changes(saved, current) == [("teachers.0.layer", -2, -1)]
    # A setting the checkpoint predates is no change at its default, and is one otherwise.
    defaults = {"optim": {"lr": 1e-4, "unfrozen": []}}
    newer = {**current, "optim": {"lr": 1e-3, "unfrozen": []}}
    assert config_changes(saved, newer, defaults) == [("teachers.0.layer", -2, -1)]
    newer["optim"]["unfrozen"] = ["llm"]
    assert ("optim.unfrozen", "(unset)", ["llm"]) in config_changes(saved, newer, defaults)


def test_save_every_0_checkpoints_only_the_last_step(tmp_path):
    cfg = config_file(tmp_path, "run", save_every=0, max_steps=3)
    run_stage("stage1", ["--config", cfg])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000003"]


@pytest.mark.parametrize("point", ["step", "checkpoint", "export"])
def test_kill_anywhere_then_resume_gives_the_uninterrupted_run(tmp_path, reference, point):
    """SIGKILL inside a step, inside a checkpoint write or inside the export; then `--resume`.

    After the kill the run directory holds either no export or a complete one (never a half-written
    one taken as done) and only complete checkpoints; the resumed run ends with the losses and the
    exported weights of the uninterrupted run, bit for bit (same thread count in both processes).
    """
    cfg = config_file(tmp_path, "run")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/train/kill_driver.py"), point, cfg],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]  # killed, not finished or failed
    run = tmp_path / "run"
    export = run / "export"
    assert not export.exists() or is_complete_export(export)
    for ckpt in list_checkpoints(run):
        assert {"meta.json", "config.json", "scheduler.pt", "train_state.pt"} <= {
            p.name for p in ckpt.iterdir()
        }
    if point == "export":
        assert not export.exists() and (run / ".tmp-export").is_dir()  # the half export stayed aside
    run_stage("stage1", ["--config", cfg, "--resume"])
    assert is_complete_export(export) and not (run / ".tmp-export").exists()
    ref_losses, ref_weights = reference
    assert losses(run) == ref_losses
    weights = load_file(str(export / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_a_run_lists_its_skipped_records_and_refuses_oversized_images(tmp_path):
    """skipped.jsonl in the run directory names each skipped record and its reason (data.max_pixels too)."""
    sft = write_llava_json(tmp_path / "data", n_samples=6)  # images 0, 1, 3, 4 and two text-only samples
    records = json.loads(sft.read_text())
    records.append(
        {"id": "gone", "image": "images/missing.png", "conversations": records[0]["conversations"]}
    )
    records.append({"id": "odd", "conversations": [{"from": "human", "value": 5}]})
    sft.write_text(json.dumps(records))
    tree = tiny_run_config(
        tmp_path,
        "stage1",
        data={
            "json": str(sft),
            "image_root": str(tmp_path / "data"),
            "template": "vicuna_v1",
            "max_pixels": 1000,
        },
        train={"max_steps": 2, "output_dir": str(tmp_path / "run")},  # several passes over the 2 good ones
    )
    run_stage("stage1", ["--config", write_yaml(tmp_path / "c.yaml", tree)])
    rows = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    reasons = {row["source"].split(" ")[-1].rstrip(")"): row["reason"] for row in rows}
    # Images 0 and 4 are 32 x 32 = 1,024 px and image 3 is 64 x 64: over max_pixels 1,000, refused
    # before decoding; image 1 (24 x 40 = 960 px) is trained.
    assert reasons == {
        "img-0": "image_too_large",
        "img-3": "image_too_large",
        "img-4": "image_too_large",
        "gone": "missing_image",
        "odd": "bad_conversation",
    }
