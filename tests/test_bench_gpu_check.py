"""bench/gpu_check.py on the CPU: every section's toy path runs, says what it skipped and why, and the
JSON holds one record per section; the FLOP count against hand-computed values."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
FIGURE_KEYS = {"name", "value", "unit", "device", "status", "note"}
SECTION_KEYS = {"key", "title", "figures", "skipped", "details", "line", "seconds"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run(gpu_check, tmp_path, only: str, *extra: str) -> dict:
    """main() on the CPU path (--device cpu: toy sizes even on a GPU machine); the JSON it wrote."""
    out = tmp_path / "bench_gpu.json"
    gpu_check.main(["--device", "cpu", "--only", only, "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_cpu_sections_a_c_d(gpu_check, tmp_path, capsys):
    report = run(gpu_check, tmp_path, "a,c,d")
    assert report["environment"]["why_no_gpu"] == "--device cpu"
    sections = report["sections"]
    assert list(sections) == ["a", "c", "d"]
    for key, sec in sections.items():
        assert set(sec) == SECTION_KEYS and sec["key"] == key
        assert sec["skipped"] and all("--device cpu" in r or "flash_attn" in r for r in sec["skipped"])
        for figure in sec["figures"]:
            assert set(figure) == FIGURE_KEYS
            assert figure["status"] != "error", figure

    # (a): the flash comparison skipped with its reason; the toy stand-in agrees within the tolerances.
    a = sections["a"]
    assert a["figures"][0]["status"] == "skipped" and "--device cpu" in a["figures"][0]["note"]
    assert a["details"]["backends"] == ["sdpa_packed", "sdpa"]
    assert (
        a["details"]["loss_rel_diff"] <= gpu_check.LOSS_RTOL
        and a["details"]["grad_rel_diff"] <= gpu_check.GRAD_RTOL
    )
    assert [f["status"] for f in a["figures"][1:]] == ["toy PASS", "toy PASS"]
    assert a["details"]["segments"] >= 2  # a packed batch: several samples in one row

    # (c): faiss-cpu at toy size measured, the GPU run skipped with the reason.
    c = sections["c"]
    assert c["details"]["n"] == 20_000 and c["details"]["cpu_s_per_iter"] > 0
    assert [f["status"] for f in c["figures"]] == ["toy", "skipped"]

    # (d): the embedded efficientnet-lite0 on a CPU batch, the ViT-L embedders skipped.
    d = sections["d"]
    assert [f["status"] for f in d["figures"]] == ["toy", "skipped"]
    assert d["figures"][0]["value"] > 0 and "efficientnet_lite0" in d["figures"][0]["name"]

    # One printed line per section, then the table with one row per figure.
    printed = capsys.readouterr().out
    assert all(f"({k}) " in printed for k in "acd")
    rows = [line for line in printed.splitlines() if line.startswith("| (")]
    assert len(rows) == sum(len(sec["figures"]) for sec in sections.values())


def test_cpu_section_b_toy_training(gpu_check, tmp_path):
    """(b) at toy size: two plain AdamW steps through the engine, a finite loss, labelled toy, MFU from --peak-tflops."""
    b = run(gpu_check, tmp_path, "b", "--peak-tflops", "1")["sections"]["b"]
    details = b["details"]
    assert details["optimizer"].startswith("torch AdamW") and "--device cpu" in details["optimizer"]
    assert len(details["losses"]) == 2 and all(0 < loss < 100 for loss in details["losses"])
    assert details["tokens_per_s"] > 0 and details["mfu_6N"] > 0
    assert details["mfu_6N_plus_attention"] > details["mfu_6N"]
    assert [f["status"] for f in b["figures"]] == ["toy", "toy", "toy"]
    # The GPU proxy is ~1B parameters (counted on the meta device): the size the brief asks for.
    assert 0.9e9 < details["gpu_proxy_parameters"] < 1.1e9
    assert "GPU proxy" in b["skipped"][0]


def test_failing_section_is_recorded_and_others_run(gpu_check, tmp_path, monkeypatch):
    def broken(machine, args, tmp):
        raise RuntimeError("no such kernel")

    monkeypatch.setitem(gpu_check.SECTIONS, "c", ("FAISS K-means", broken))
    sections = run(gpu_check, tmp_path, "c,d")["sections"]
    assert sections["c"]["figures"][0]["status"] == "error"
    assert "RuntimeError: no such kernel" in sections["c"]["figures"][0]["note"]
    assert sections["d"]["figures"][0]["status"] == "toy"


def test_attention_flops_by_hand(gpu_check):
    # Segments of 3, 2 and 1 tokens (position_ids restart at 0): 6 * (9 + 4 + 1) * d * layers.
    batch = {"position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]])}
    assert gpu_check.segment_lengths(batch["position_ids"]) == [3, 2, 1]
    assert gpu_check.attention_flops(batch, hidden_size=8, num_layers=2) == 6 * 14 * 8 * 2


def test_kmeans_child_process(tmp_path):
    """The CPU side of (c) on a GPU machine: a child process that sees no GPU prints its seconds as JSON."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--kmeans-child", "2000", "32", "10", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["seconds"] > 0


def test_help_says_how_to_run_on_a_gpu(gpu_check, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--help"])
    assert exit_info.value.code == 0
    assert "python bench/gpu_check.py --out bench_gpu.json" in capsys.readouterr().out


def test_cpu_section_e_eve2_layers(gpu_check, tmp_path):
    """(e) builds an EVEv2 model (routed per-modality layers) and checks the two backends agree."""
    e = run(gpu_check, tmp_path, "e")["sections"]["e"]
    assert e["details"]["shape"] == "tiny-eve2 preset" and e["details"]["segments"] >= 2
    assert [f["status"] for f in e["figures"]] == ["skipped", "toy PASS", "toy PASS"]
    # The section's model is EVEv2's: its layers carry visual copies, so routing ran in the check.
    from eve import EveConfig

    config = EveConfig.from_preset(gpu_check.TOY_EVE2.preset)
    assert config.modality_split and config.vision_frontend == "pel2"
    assert gpu_check.GPU_EVE2.preset == "eve2-7b"
