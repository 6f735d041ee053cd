"""Kill and resume: the resumed run continues with exactly the losses of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train.synthetic import (
    losses,
    stage1_config_file,
    tiny_run_config,
    write_llava_json,
    write_yaml,
)
from train.checkpointing import list_checkpoints
from train.cli import run_stage

REPO = Path(__file__).resolve().parents[2]


config_file = stage1_config_file


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 8-step run (checkpoints every 2 steps)."""
    tmp = tmp_path_factory.mktemp("ref")
    run_stage("stage1", ["--config", config_file(tmp, "ref")])
    return losses(tmp / "ref")


def test_stop_and_resume_in_process(tmp_path, reference):
    """Stop after step 5 (last checkpoint: step 4), resume: steps 5-8 equal the reference exactly."""
    cfg = config_file(tmp_path, "run")
    assert run_stage("stage1", ["--config", cfg, "--train.stop_after", "5"]) == tmp_path / "run"
    assert not (tmp_path / "run" / "export").exists()  # an interrupted run does not export
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000002", "step-0000004"]
    run_stage("stage1", ["--config", cfg, "--resume"])
    # Same ops on the same inputs in the same order (one process, fixed thread count): bitwise equal.
    assert losses(tmp_path / "run") == reference
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-0000006", "step-0000008"]


def test_resume_restores_data_position_and_rng(tmp_path):
    """A checkpoint holds the per-rank data position and RNG states that make the next batch the same."""
    cfg = config_file(tmp_path, "run")
    run_stage("stage1", ["--config", cfg, "--train.stop_after", "2"])
    state = torch.load(list_checkpoints(tmp_path / "run")[-1] / "rank-00000.pt", weights_only=True)
    assert (
        state["data"]["positions"][0]["batches_done"] > 0 or state["data"]["positions"][0]["windows_done"] > 0
    )
    assert set(state["rng"]) >= {"python", "numpy", "torch"}


def test_sigkill_and_resume(tmp_path, reference):
    """A real SIGKILL mid-run (maybe mid-checkpoint), then `--resume`: the remaining losses are the same."""
    cfg = config_file(tmp_path, "run")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train/pretrain_stage1.py"), "--config", cfg],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not list_checkpoints(tmp_path / "run") and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert killed_at and "step-0000008" not in killed_at
    assert not (tmp_path / "run" / "export").exists()
    # The resumed run in this process: the subprocess used the same thread count, so the arithmetic
    # is the same and the losses are bitwise equal to the uninterrupted run's.
    run_stage("stage1", ["--config", cfg, "--resume", "auto"])
    assert losses(tmp_path / "run") == reference


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, reference):
    cfg = config_file(tmp_path, "run")
    run_stage("stage1", ["--config", cfg, "--resume", "auto", "--train.stop_after", "1"])
    assert losses(tmp_path / "run") == reference[:1]


def test_resume_from_a_missing_path_is_an_error(tmp_path):
    cfg = config_file(tmp_path, "run")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_stage("stage1", ["--config", cfg, "--resume", str(tmp_path / "nope")])


def test_sft_resume_with_text_only_samples(tmp_path):
    """SFT (LLaVA JSON with text-only samples, padded rows): stop + resume == uninterrupted."""
    sft = write_llava_json(tmp_path / "sft", n_samples=12)
    init = run_stage("stage1", ["--config", config_file(tmp_path, "init", max_steps=1, save_every=0)])
    trees = {}
    for name in ("ref", "run"):
        tree = tiny_run_config(
            tmp_path,
            "sft",
            data={"json": str(sft), "image_root": str(tmp_path / "sft"), "packing": False, "window": 4},
            model={"init_path": str(init)},
            train={
                "max_steps": 5,
                "save_every": 2,
                "output_dir": str(tmp_path / name),
                "micro_batch_size": 1,
            },
        )
        trees[name] = write_yaml(tmp_path / f"{name}.yaml", tree)
    run_stage("sft", ["--config", str(trees["ref"])])
    run_stage("sft", ["--config", str(trees["run"]), "--train.stop_after", "3"])
    run_stage("sft", ["--config", str(trees["run"]), "--resume"])
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
