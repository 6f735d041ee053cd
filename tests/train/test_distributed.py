"""DeepSpeed on CPU (gloo): 2 ranks with ZeRO-3 == 1 rank with gradient accumulation; sharded resume.

The data are a LLaVA JSON where every third sample is text-only, in micro-batches of one sample: a
rank regularly holds an image-free micro-batch while the other holds an image, which would deadlock
ZeRO-3 unless every rank runs the same parameter gathers (the dummy image of train/packing.py).
With one sample per micro-batch and a one-record window, rank r reads records r, r+2, ...: step k
of both runs sees the same 4 samples, so their losses must agree.

The first DeepSpeed run on a fresh machine compiles its CPU communication op (~90 s, cached in
~/.cache/torch_extensions); afterwards one 2-process launch takes ~20 s here.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train.synthetic import tiny_run_config, write_llava_json, write_shards, write_yaml
from train.checkpointing import list_checkpoints
from train.cli import run_stage
from train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
LOGGED = ("loss", "ce_loss", "align_loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], script: str, args: list[str], timeout: int = 600) -> None:
    # A launcher's variables must come from the launcher, not from this process's environment.
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [*launcher, str(REPO / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def deepspeed_launcher(nproc: int) -> list[str]:
    """The `deepspeed` launcher (it appends --local_rank) for nproc local ranks on a free port."""
    return [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]


def torchrun(nproc: int) -> list[str]:
    # --standalone: a local rendezvous on a port the OS assigns (no probe-then-bind race).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """An init export (1 step of stage 1) and the SFT config of the comparison."""
    tmp = tmp_path_factory.mktemp("dist")
    shards = write_shards(tmp / "shards", n_samples=8, per_shard=8)
    s1 = tiny_run_config(
        tmp, "stage1", data={"shards": shards}, train={"max_steps": 1, "output_dir": str(tmp / "s1")}
    )
    init = run_stage("stage1", ["--config", write_yaml(tmp / "s1.yaml", s1)])
    sft_json = write_llava_json(tmp / "sft", n_samples=16)
    tree = tiny_run_config(
        tmp,
        "sft",
        model={"init_path": str(init)},
        data={"json": str(sft_json), "image_root": str(tmp / "sft"), "window": 1, "packing": True},
        train={"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 4, "save_every": 2},
    )
    path = write_yaml(tmp / "sft.yaml", tree)
    return tmp, path, reference_run(path, tmp / "ref")


def reference_run(config_path, out, *extra) -> list[dict]:
    """The reference: one plain process (one thread), 4 micro-batches per step; its metrics."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_stage("sft", ["--config", str(config_path), "--train.output_dir", str(out), *extra])
    finally:
        torch.set_num_threads(torch_threads)
    return read_metrics(out)


def assert_same_losses(records, reference):
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for got, want in zip(records, reference):
        for key in LOGGED:
            # Different reduction orders (gloo all-reduce of per-rank sums vs one accumulation buffer,
            # ZeRO's flat fp32 partitions): fp32 rounding ~1e-7 per step, and 4 AdamW steps on a
            # tiny model amplify it at most to ~1e-6 relative; measured here: < 3e-9.
            assert got[key] == pytest.approx(want[key], rel=2e-5), (got["step"], key)
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)


def zero3_args(config_path, out) -> list[str]:
    """Command line of an SFT run under configs/deepspeed/zero3.json writing into `out`."""
    return [
        "--config",
        str(config_path),
        "--train.deepspeed",
        "configs/deepspeed/zero3.json",
        "--train.output_dir",
        str(out),
    ]


def test_two_ranks_zero3_equal_one_rank_and_resume(sft_setup):
    """torchrun, 2 ranks, ZeRO-3: stop after step 2, resume from the sharded checkpoint, finish."""
    tmp, path, reference = sft_setup
    out = tmp / "zero3"
    args = zero3_args(path, out)
    launch(torchrun(2), "train/sft.py", [*args, "--train.stop_after", "2"])
    assert [p.name for p in list_checkpoints(out)] == ["step-0000002"]
    assert sorted(p.name for p in (list_checkpoints(out)[0] / "ds").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",  # ZeRO-3: each rank holds its optimizer shard
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    launch(torchrun(2), "train/sft.py", [*args, "--resume"])
    assert_same_losses(read_metrics(out), reference)
    # The export gathers the ZeRO-3 shards into a full model that loads on its own.
    from eve import EveForCausalLM
    from train.aligning import PatchAligner

    model = EveForCausalLM.from_pretrained(str(out / "export"))
    assert sum(p.numel() for p in model.parameters()) > 4_000_000
    PatchAligner.load(out / "export")


@pytest.mark.slow
def test_deepspeed_launcher_zero2(sft_setup):
    """The `deepspeed` launcher (it appends --local_rank), 2 ranks, ZeRO-2: same losses."""
    tmp, path, reference = sft_setup
    out = tmp / "zero2"
    args = [
        "--config",
        str(path),
        "--train.deepspeed",
        "configs/deepspeed/zero2.json",
        "--train.output_dir",
        str(out),
    ]
    launch(deepspeed_launcher(2), "train/sft.py", args)
    assert_same_losses(read_metrics(out), reference)
    assert (out / "export" / "model.safetensors").is_file()


def test_one_process_zero3_under_plain_python(sft_setup):
    """`python train/sft.py --train.deepspeed ...` (no launcher): a one-process group, accumulation 4."""
    tmp, path, reference = sft_setup
    out = tmp / "zero3_single"
    args = zero3_args(path, out)
    launch([sys.executable], "train/sft.py", args)
    assert_same_losses(read_metrics(out), reference)


@pytest.mark.slow
def test_two_ranks_zero3_with_frozen_lower_layers(sft_setup):
    """optim.frozen + optim.frozen_llm_layers under ZeRO-3 (2 ranks) == one plain process, and the held
    weights leave the run exactly as they came in."""
    from safetensors.torch import load_file

    tmp, path, _ = sft_setup
    frozen = ["--optim.frozen", '["vision", "projector"]', "--optim.frozen_llm_layers", "1"]
    reference = reference_run(path, tmp / "ref_frozen", *frozen)
    out = tmp / "zero3_frozen"
    launch(torchrun(2), "train/sft.py", [*zero3_args(path, out), *frozen])
    assert_same_losses(read_metrics(out), reference)
    init = load_file(
        str(Path(yaml.safe_load(Path(path).read_text())["model"]["init_path"]) / "model.safetensors")
    )
    after = load_file(str(out / "export" / "model.safetensors"))
    held = ("vision_tower.", "model.embed_tokens.", "model.layers.0.")
    assert any(k.startswith(held) for k in init)
    for key, value in init.items():
        assert torch.equal(after[key], value) == key.startswith(held), key


def test_two_ranks_zero3_eve2_equal_one_rank(tmp_path):
    """EVEv2 (visual layer copies) under ZeRO-3, 2 ranks == one plain process. Every third sample is
    text-only, so one rank often has no image token while the other routes its images through the
    visual copies: the dummy image must make both gather the same parameters, or the run hangs."""
    shards = write_shards(tmp_path / "shards", n_samples=8, per_shard=8)
    eve2 = {"preset": "tiny-eve2", "overrides": {"hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}}  # fmt: skip
    s0 = tiny_run_config(
        tmp_path,
        "eve2_stage0",
        model=eve2,
        teachers=[],
        data={"shards": shards},
        train={"max_steps": 1, "output_dir": str(tmp_path / "s0")},
    )
    init = run_stage("eve2_stage0", ["--config", write_yaml(tmp_path / "s0.yaml", s0)])
    sft_json = write_llava_json(tmp_path / "sft", n_samples=16)
    tree = tiny_run_config(
        tmp_path,
        "sft",
        model={**eve2, "init_path": str(init)},
        teachers=[],
        data={"json": str(sft_json), "image_root": str(tmp_path / "sft"), "window": 1, "packing": True},
        train={"global_batch_size": 4, "micro_batch_size": 1, "max_steps": 3},
    )
    path = write_yaml(tmp_path / "sft.yaml", tree)
    reference = reference_run(path, tmp_path / "ref")
    out = tmp_path / "zero3"
    launch(torchrun(2), "train/sft.py", zero3_args(path, out))
    records = read_metrics(out)
    assert [r["step"] for r in records] == [r["step"] for r in reference] == [1, 2, 3]
    for got, want in zip(records, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-5), got["step"]
    from eve import EveForCausalLM

    model = EveForCausalLM.from_pretrained(str(out / "export"))
    assert model.config.modality_split and hasattr(model.model.layers[0], "visual")


def lora_config_file(tmp: Path, path: str) -> str:
    """The comparison's SFT config with rank-4 adapters as the only trained parameters of the model."""
    tree = yaml.safe_load(Path(path).read_text())
    tree["lora"] = {"enabled": True, "r": 4, "alpha": 8.0}
    # lr 1e-2, no warmup: the adapters (B = 0 at the start) move far enough in 4 steps to change the
    # logits well above the export comparison's tolerance.
    tree["optim"].update(lr=1e-2, warmup_ratio=0.0, frozen=["vision", "projector"])
    return write_yaml(tmp / "sft_lora.yaml", tree)


@pytest.fixture(scope="module")
def lora_setup(sft_setup):
    """The LoRA comparison: (tmp, config file, metrics of its one-process reference run in tmp/ref_lora)."""
    tmp, path, _ = sft_setup
    lora_path = lora_config_file(tmp, path)
    return tmp, lora_path, reference_run(lora_path, tmp / "ref_lora")


@torch.no_grad()
def export_logits(export: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of an export loaded as a plain EveForCausalLM (no adapter in it) on the inputs."""
    from eve import EveForCausalLM

    model = EveForCausalLM.from_pretrained(str(export)).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    return model(**inputs).logits


@pytest.mark.slow  # ~50 s: the default run keeps the EVEv2 and plain ZeRO-3 launches
def test_two_ranks_zero3_lora_equal_one_rank(sft_setup, lora_setup):
    """LoRA under ZeRO-3, 2 ranks == one plain process: the adapters shard like any other parameter,
    and the export gathers them and merges them into the base weights (a plain EveForCausalLM)."""
    from safetensors.torch import load_file

    from eve import EveProcessor
    from tests.train.synthetic import draw
    from train.lora import ADAPTER_DIR

    _, path, _ = sft_setup
    tmp, lora_path, reference = lora_setup
    out = tmp / "zero3_lora"
    launch(torchrun(2), "train/sft.py", zero3_args(lora_path, out))
    assert_same_losses(read_metrics(out), reference)

    ref_export, export = tmp / "ref_lora" / "export", out / "export"
    exported = load_file(str(export / "model.safetensors"))
    assert sorted(exported) == sorted(load_file(str(ref_export / "model.safetensors")))
    assert not any("lora" in k or "base_layer" in k for k in exported)
    assert (export / ADAPTER_DIR / "adapter_model.safetensors").is_file()  # only the adapters trained
    processor = EveProcessor.from_pretrained(str(ref_export))
    inputs = processor([processor.build_prompt("What colour is the shape?", has_image=True)], [draw(5)[0]])
    want = export_logits(ref_export, inputs)
    init = Path(yaml.safe_load(Path(path).read_text())["model"]["init_path"])
    assert (export_logits(init, inputs) - want).abs().max() > 0.5  # the adapters did change the model
    # The runs' fp32 reduction orders differ (see assert_same_losses), and 4 AdamW steps carry that into
    # the adapters (measured: 3e-5 of their largest entry); the logits (|x| < 1) then differ by ~4e-7.
    # 1e-5 leaves a 25x margin and is 10^5 below the adapters' effect on them (~1).
    torch.testing.assert_close(export_logits(export, inputs), want, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_deepspeed_launcher_zero2_lora(lora_setup):
    """LoRA under the `deepspeed` launcher, 2 ranks, ZeRO-2: same losses, and the same merged export."""
    from safetensors.torch import load_file

    tmp, lora_path, reference = lora_setup
    out = tmp / "zero2_lora"
    args = [
        "--config",
        lora_path,
        "--train.deepspeed",
        "configs/deepspeed/zero2.json",
        "--train.output_dir",
        str(out),
    ]
    launch(deepspeed_launcher(2), "train/sft.py", args)
    assert_same_losses(read_metrics(out), reference)
    got = load_file(str(out / "export" / "model.safetensors"))
    want = load_file(str(tmp / "ref_lora" / "export" / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        # Merged weights W + 2 B A: only the adapters' reduction-order differences (see the ZeRO-3 test)
        # reach them, scaled by |B A| << |W| (measured: 1e-7; |W| of the projections up to ~0.2).
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=0, msg=key)
