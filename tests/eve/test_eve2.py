"""EVEv2 against independent references: the official dense mixing formula, transformers' Qwen2, plain convs."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from eve import EveConfig, EveForCausalLM
from eve.image_processing_eve import EveImageProcessor
from eve.patch_embedding import Eve2PatchEmbedding, patchify
from tests.conftest import TINY_OVERRIDES
from tests.eve.test_modeling import collate, image_sample

# fp32 throughout. The sparse path and the references run the same ops on differently shaped (gathered,
# padded or masked) inputs, so only the summation order differs: ~1e-6 on O(1-10) values after 2 layers.
ATOL = 1e-5

# tiny-eve2 at the size of the other model tests (tests/conftest.py): 2 Qwen2 layers of width 64, GQA 4/2,
# 4-px patches, 2 x 2 merge (8 px per token), sqrt(H*W) = 32 px.
TINY2 = TINY_OVERRIDES


def tiny_eve2(preset: str = "tiny-eve2", **overrides) -> EveForCausalLM:
    """A seeded tiny model whose visual copies, biases and norms differ from the text ones (so each counts)."""
    torch.manual_seed(0)
    model = EveForCausalLM._from_config(EveConfig.from_preset(preset, **{**TINY2, **overrides})).eval()
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if ".visual." in name or name.endswith(("bias", "layernorm.weight")):
                param.add_(0.1 * torch.randn_like(param))
    return model


def two_samples_per_row(config):
    """Two packed rows of two samples each (images in both rows, a text-only sample), position_ids restarting."""
    rows = [
        [
            image_sample(config, [1, 319], (16, 40), [29871, 13, 450], seed=1),
            image_sample(config, [1, 910, 338], None, [263]),
        ],
        [
            image_sample(config, [1, 22172], (32, 8), [3303], seed=2),
            image_sample(config, [1, 5], (24, 24), [6, 7], seed=3),
        ],
    ]
    length = (
        max(sum(len(s[0]) for s in row) for row in rows) + 2
    )  # a pad tail restarting at 0, as the collator's
    ids, pos, pixels, grids = [], [], [], []
    for row in rows:
        tail = length - sum(len(s[0]) for s in row)
        ids.append(sum((s[0] for s in row), []) + [0] * tail)
        pos.append(torch.cat([torch.arange(len(s[0])) for s in row] + [torch.arange(tail)]))
        pixels += [s[1] for s in row if s[1] is not None]
        grids += [s[2] for s in row if s[2] is not None]
    return dict(
        input_ids=torch.tensor(ids),
        position_ids=torch.stack(pos),
        pixel_values=torch.cat(pixels),
        image_grid_hw=torch.cat(grids),
    )


def dense_reference_logits(model: EveForCausalLM, batch: dict) -> torch.Tensor:
    """The official formula written out: every split part is raw(x) * (1 - m) + visual(x) * m on all tokens,
    attention a plain masked softmax (block-diagonal causal over packed samples, padded keys masked)."""
    cfg = model.config
    ids = batch["input_ids"]
    embeds = model.embed_inputs(ids, batch.get("pixel_values"), batch.get("image_grid_hw"))  # (B, T, D)
    b, t = ids.shape
    m = (ids == cfg.image_token_index).float()[..., None]  # (B, T, 1)
    pos = batch.get("position_ids", torch.arange(t).expand(b, t))
    segment = torch.cumsum(pos == 0, dim=1)  # (B, T) sample number inside a row
    valid = batch.get("attention_mask", torch.ones(b, t)).bool()
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool)) & (segment[:, :, None] == segment[:, None, :])
    allowed &= valid[:, None, :]  # (B, T, T)
    hd = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = cfg.rope_parameters["rope_theta"] ** (-torch.arange(0, hd, 2).float() / hd)
    angles = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)[:, None]  # (B, 1, T, hd)

    def rope(x):  # x (B, H, T, hd): rotate the two halves
        half = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], dim=-1)
        return x * angles.cos() + half * angles.sin()

    def mix(raw, visual, x):  # a part that is not split has no visual copy: the LLM's module for all
        return raw(x) if visual is None else raw(x) * (1 - m) + visual(x) * m

    h = embeds
    for layer in model.model.layers:
        a = layer.self_attn
        v = SimpleNamespace(**{n: getattr(layer.visual, n, None) for n in VISUAL_NAMES})
        x = mix(layer.input_layernorm, v.input_layernorm, h)
        q = mix(a.q_proj, v.q_proj, x).view(b, t, -1, hd).transpose(1, 2)
        k = mix(a.k_proj, v.k_proj, x).view(b, t, -1, hd).transpose(1, 2)
        val = mix(a.v_proj, v.v_proj, x).view(b, t, -1, hd).transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        k, val = k.repeat_interleave(groups, 1), val.repeat_interleave(groups, 1)
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1) @ val  # (B, H, T, hd)
        h = h + mix(a.o_proj, v.o_proj, attn.transpose(1, 2).reshape(b, t, -1))
        h = h + mix(layer.mlp, v.mlp, mix(layer.post_attention_layernorm, v.post_attention_layernorm, h))
    return model.lm_head(model.model.norm(h))


VISUAL_NAMES = ("input_layernorm", "post_attention_layernorm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp")


@pytest.mark.parametrize("layout", ["padded", "packed", "packed_checkpointed", "packed_mlp_split_only"])
def test_sparse_layers_equal_the_dense_official_formula(layout):
    """Routed layers == the dense masked mix, forward and gradients of both branches (sdpa_packed backend)."""
    split = {"modality_split": ["mlp"]} if layout == "packed_mlp_split_only" else {}
    model = tiny_eve2(attn_implementation="sdpa_packed", **split)
    cfg = model.config
    if layout == "padded":
        samples = [
            image_sample(cfg, [1, 319], (16, 40), [29871, 13, 450], seed=1),
            image_sample(cfg, [1, 910, 338, 263, 1243], None, [3303]),
            image_sample(cfg, [1, 22172], (32, 8), [3303], seed=2),
        ]
        batch = collate(samples)
        keep = batch["attention_mask"].bool()
    else:
        batch = two_samples_per_row(cfg)
        keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if layout == "packed_checkpointed":
        model.train()  # dropout is 0: the same function, now recomputed in backward
        model.activation_checkpointing_enable()
    weights = torch.randn(*batch["input_ids"].shape, 8)  # a loss reading 8 logits of every real token

    def loss_and_grads(logits):
        loss = (logits[..., :8] * weights)[keep].sum()
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = model(**batch).logits
    ref = dense_reference_logits(model, batch)
    torch.testing.assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0)
    grads, ref_grads = loss_and_grads(ours), loss_and_grads(ref)
    assert grads.keys() == ref_grads.keys()
    parts = ["visual.mlp.down_proj.weight", "self_attn.k_proj.bias", "mlp.up_proj.weight"]
    parts += ["post_attention_layernorm.weight"]
    if not split:
        parts += ["visual.q_proj.weight", "visual.input_layernorm.weight"]
    else:
        assert not any(".visual.q_proj" in n or ".visual.input_layernorm" in n for n in grads)
    for part in parts:
        assert f"model.layers.0.{part}" in grads  # both branches, every split part, get gradients
    assert "vision_tower.conv.weight" in grads and "vision_tower.split_embedding" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=1e-4, msg=name)


def qwen2_twin(model: EveForCausalLM) -> Qwen2ForCausalLM:
    """transformers' Qwen2ForCausalLM holding the model's text weights (strict load: nothing left over)."""
    c = model.config
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    fields += ("num_key_value_heads", "rms_norm_eps", "rope_parameters", "max_position_embeddings")
    fields += ("tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
    qwen = Qwen2ForCausalLM(Qwen2Config(**{k: getattr(c, k) for k in fields})).eval()
    text = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("vision_tower.") and ".visual." not in k
    }
    qwen.load_state_dict(text, strict=True)
    return qwen


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-eve2"])
def test_text_only_equals_transformers_qwen2(preset):
    """No image: the Qwen2 backbone (shared or split layers) gives exactly transformers' Qwen2 logits."""
    model = tiny_eve2(preset)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None and attn.k_proj.out_features == 2 * 16
    qwen = qwen2_twin(model)
    ids = torch.tensor([[1, 910, 338, 263, 1243], [0, 0, 1, 22172, 3303]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        theirs = qwen(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=0, rtol=0)  # the same ops


def test_from_llm_reads_a_qwen2_directory(tmp_path):
    """from_llm(Qwen2 dir): backbone qwen2, text logits equal the source, visual copies start as its weights."""
    qwen = qwen2_twin(tiny_eve2("tiny-qwen2"))
    qwen.save_pretrained(tmp_path)
    vision = {k: v for k, v in TINY2.items() if k.startswith(("vision", "max"))}
    split = dict(vision_frontend="pel2", modality_split=["layernorm", "self_attn", "mlp"])
    eve = EveForCausalLM.from_llm(tmp_path, **vision, **split).eval()
    assert eve.config.backbone == "qwen2" and eve.config.num_key_value_heads == 2
    layer = eve.model.layers[1]
    assert torch.equal(layer.visual.k_proj.bias, layer.self_attn.k_proj.bias)
    assert torch.equal(layer.visual.mlp.gate_proj.weight, layer.mlp.gate_proj.weight)
    ids = torch.tensor([[1, 910, 338, 263, 1243]])
    with torch.no_grad():
        assert torch.equal(eve(input_ids=ids).logits, qwen(input_ids=ids).logits)


def test_pel2_equals_per_image_convs():
    """Packed EVEv2 patch embedding == Conv2d -> GELU -> Conv2d per image, CLS first, SPL closing each row."""
    config = EveConfig.from_preset("tiny-eve2", **TINY2)
    torch.manual_seed(0)
    pel = Eve2PatchEmbedding(config)
    nn.init.normal_(pel.class_embedding)
    nn.init.normal_(pel.split_embedding)
    sizes = [(16, 40), (32, 8), (24, 24), (8, 8)]  # grids 2x5, 4x1, 3x3, 1x1: any aspect ratio
    images = [torch.randn(3, *size) for size in sizes]
    grids = torch.tensor([[h // 8, w // 8] for h, w in sizes])
    out = pel(torch.cat([patchify(im, 4, 2) for im in images]), grids)
    counts = [1 + h * (w + 1) for h, w in grids.tolist()]
    assert out.shape == (sum(counts), config.hidden_size)
    conv1, conv2 = nn.Conv2d(3, 32, 4, stride=4), nn.Conv2d(32, 64, 2, stride=2)
    conv1.load_state_dict(pel.conv.state_dict())
    conv2.load_state_dict(pel.projector.state_dict())
    with torch.no_grad():
        for image, got in zip(images, out.split(counts)):
            grid = conv2(F.gelu(conv1(image[None])))[0]  # (D, h, w)
            spl = pel.split_embedding[:, None, None].expand(-1, grid.shape[1], 1)
            rows = torch.cat([grid, spl], dim=2).flatten(1).T  # (h*(w+1), D)
            torch.testing.assert_close(got, torch.cat([pel.class_embedding[None], rows]), atol=ATOL, rtol=0)


def test_area_resize_follows_the_official_rule():
    """EVEv2 sizes by area: sqrt(H*W) -> max_size, each side rounded up to p*s (hand-computed values)."""
    processor = EveImageProcessor.from_config(EveConfig.from_preset("tiny-eve2"))  # 64 px, 8 px per token
    # 50 x 100: scale sqrt(5000)/64 = 1.105; 45.25 -> 48 and 90.51 -> 96 px: a 6 x 12 grid.
    assert processor.grid_hw(50, 100) == (6, 12)
    # No cap on the long side (as the official code): 1 x 4000 -> scale 0.988, 4047.7 px -> 506 tokens.
    assert processor.grid_hw(64, 64) == (8, 8) and processor.grid_hw(1, 4000) == (1, 506)
    assert EveImageProcessor.from_config(EveConfig.from_preset("eve2-7b")).grid_hw(1000, 1000) == (25, 25)


def test_save_load_and_batched_generate(tmp_path):
    """save -> AutoModelForCausalLM: same weights and logits; left-padded batched greedy == one by one ==
    argmax of a cache-free forward (decoding runs new text tokens through the text branch only)."""
    model = tiny_eve2()
    cfg = model.config
    samples = [
        image_sample(cfg, [1, 319, 1967], (32, 16), [29871, 13], seed=1),
        image_sample(cfg, [1, 910, 338, 263], None, [727]),
        image_sample(cfg, [1, 22172], (8, 24), [450], seed=2),
    ]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    batch = collate(samples, left=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        # 1e-6: memory-mapped loaded weights may take another SIMD path (see test_modeling's round trip).
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
        batched = loaded.generate(**batch, **kwargs)[:, -5:]
        for row, sample in enumerate(samples):
            alone = collate([sample])
            out = loaded.generate(**alone, **kwargs)
            assert torch.equal(batched[row], out[0, -5:]), row
            full = loaded(**{**alone, "input_ids": out, "attention_mask": torch.ones_like(out)}).logits
            assert torch.equal(full[0, -6:-1].argmax(-1), out[0, -5:]), row
