"""PAL input memory: hook-gathered image patches of the chosen layers vs stacking every hidden state.

The official EVE code calls the LLM with output_hidden_states=True and `torch.stack`s all L+1 hidden
states of the whole sequence; we gather (N, D) patch rows of layers L, L-4, ..., 0 as they run.
Measured on a tiny EVE (bytes of the tensors each approach keeps alive until the PAL runs), then the
same arithmetic for EVE-7B (33 hidden states, D = 4096, 601-token image + ~100 text tokens).
"""

import logging

import numpy as np
import torch
from PIL import Image

from train.aligning import layers_for

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("bench_aligning_memory")


def nbytes(tensors) -> int:
    """Total bytes of a sequence of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    from eve import EveConfig, EveForCausalLM, EveProcessor
    from eve.assets import load_default_tokenizer

    cfg = EveConfig.from_preset(
        "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        vision_hidden_size=32,
        vision_num_heads=4,
        vision_patch_size=4,
        max_image_size=64,
    )
    torch.manual_seed(0)
    model = EveForCausalLM(cfg).eval()
    proc = EveProcessor.from_config(load_default_tokenizer(), cfg)
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    turns = [
        {"from": "human", "value": "<image>\nDescribe it."},
        {"from": "gpt", "value": "A picture. " * 20},
    ]
    enc = proc.encode(turns, img, template="vicuna_v1")
    batch = {
        "input_ids": torch.tensor([enc["input_ids"]] * 4),
        "pixel_values": torch.cat([enc["pixel_values"]] * 4),
        "image_grid_hw": torch.cat([enc["image_grid_hw"]] * 4),
    }
    layers = layers_for(cfg.num_hidden_layers, 4)
    with torch.no_grad():
        gathered = model(**batch, image_hidden_layers=layers).image_hidden_states
        full = model(**batch, output_hidden_states=True).hidden_states
        stacked = torch.stack(full, dim=2)  # the official code's (B, T, L+1, D)
    g, s = nbytes(gathered), nbytes(full) + nbytes([stacked])
    log.info(
        "tiny EVE (8 layers, 4 x %d tokens): gathered %d layers x %d patches = %.1f KiB; "
        "stacked all %d hidden states = %.1f KiB; ratio %.3f (target <= 1/3)",
        batch["input_ids"].shape[1],
        len(layers),
        gathered[0].shape[0],
        g / 1024,
        len(full),
        s / 1024,
        g / s,
    )
    # EVE-7B arithmetic, bf16, per sample: 24x24 patches of a 601-token image + 100 text tokens
    d, n_hidden, n_sel, patches, seq = 4096, 33, len(layers_for(32, 4)), 576, 701
    g7, s7 = n_sel * patches * d * 2, 2 * n_hidden * seq * d * 2
    log.info(
        "EVE-7B per sample (bf16): gathered %.1f MiB vs stacked %.1f MiB; ratio %.3f",
        g7 / 2**20,
        s7 / 2**20,
        g7 / s7,
    )


if __name__ == "__main__":
    main()
