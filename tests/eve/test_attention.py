"""The "sdpa_packed" backend against transformers' "eager" and "sdpa" and a per-segment reference."""

import pytest
import torch
import torch.nn.functional as F

from eve.attention import SDPA_PACKED, PackedSegments, sdpa_packed_attention_forward, sdpa_packed_mask
from tests.eve.test_modeling import collate, pack_row

# Tolerances. All comparisons are fp32 and differ only in summation order (segment-batched SDPA
# vs the masked math path vs eager's matmul + softmax): values of O(1-10) after 2 layers agree to
# ~1e-6, so 1e-5 as in test_modeling. Gradients are sums over every token of the row, O(1e-2..1),
# and accumulate that rounding once more: 1e-5 absolute plus 1e-4 relative.
ATOL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4
PAD_TAIL = 5  # tokens of padding at the end of the packed row (its positions restart at 0 too)


def packed_batch(samples) -> dict:
    """One packed row of the samples plus a pad tail, with labels on the text tokens."""
    row = pack_row(samples)
    row["input_ids"] = F.pad(row["input_ids"], (0, PAD_TAIL), value=0)
    row["position_ids"] = torch.cat([row["position_ids"], torch.arange(PAD_TAIL)[None]], dim=1)
    labels = row["input_ids"].masked_fill(row["input_ids"] < 0, -100)
    labels[:, -PAD_TAIL:] = -100
    return {**row, "labels": labels}


def run(model, impl: str, batch: dict, train: bool = False):
    """(logits or loss output, {param: grad}) of one forward (+ backward when train) under impl."""
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}), {}
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_row_same_logits_loss_and_grads(tiny_model, samples):
    """A packed row of 3 samples (20, 8, 9 tokens) + pad tail: same logits, loss and grads as eager, sdpa."""
    batch = packed_batch(samples)
    ours, _ = run(tiny_model, SDPA_PACKED, batch)
    refs = {impl: run(tiny_model, impl, batch)[0] for impl in ("eager", "sdpa")}
    for impl, ref in refs.items():
        # All tokens, the pad tail included: it is its own segment in both (transformers' mask too).
        torch.testing.assert_close(ours.logits, ref.logits, atol=ATOL, rtol=0, msg=impl)

    tiny_model.train()
    ours, ours_grads = run(tiny_model, SDPA_PACKED, batch, train=True)
    assert ours_grads
    for impl in ("eager", "sdpa"):
        ref, ref_grads = run(tiny_model, impl, batch, train=True)
        torch.testing.assert_close(ours.loss, ref.loss, atol=ATOL, rtol=0, msg=impl)
        assert ours.n_loss_tokens == ref.n_loss_tokens
        assert ours_grads.keys() == ref_grads.keys()
        for name, grad in ours_grads.items():
            torch.testing.assert_close(
                grad, ref_grads[name], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=f"{impl}: {name}"
            )


def test_packed_mask_is_a_plan_not_a_dense_mask(tiny_model, samples):
    """For a packed row the mask interface hands over PackedSegments; unpacked rows get sdpa's mask."""
    from transformers.masking_utils import create_causal_mask

    tiny_model.set_attn_implementation(SDPA_PACKED)
    batch = packed_batch(samples)
    embeds = torch.zeros(1, batch["input_ids"].shape[1], tiny_model.config.hidden_size)
    mask = create_causal_mask(tiny_model.config, embeds, None, None, position_ids=batch["position_ids"])
    assert isinstance(mask, PackedSegments)
    # Buckets by power-of-two length: {20} -> 32, {8, 5 (pad tail)} -> 8, {9} -> 16.
    assert sorted(tuple(g.shape) for g in mask.gathers) == [(1, 9), (1, 20), (2, 8)]
    plain = torch.arange(embeds.shape[1])[None]
    assert create_causal_mask(tiny_model.config, embeds, None, None, position_ids=plain) is None


def test_attention_function_equals_per_segment_sdpa():
    """Two rows with segments of many lengths (GQA, bf16-free fp32) == SDPA run on each segment alone."""
    g = torch.Generator().manual_seed(0)
    lengths = [[1, 7, 30, 2, 24], [64]]  # row 1 unpacked (one segment) next to a packed row 0
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])  # (2, 64)
    q = torch.randn(2, 4, 64, 8, generator=g)  # (B, H, T, d)
    k, v = torch.randn(2, 2, 64, 8, generator=g), torch.randn(2, 2, 64, 8, generator=g)  # (B, H_kv, T, d)
    restarts = position_ids[:, 1:] - position_ids[:, :-1] == 1  # may t see t-1
    plan = sdpa_packed_mask(2, 64, 64, mask_function=lambda b, h, qi, ki: restarts[b, qi - 1] & (ki <= qi))
    assert isinstance(plan, PackedSegments)
    module = torch.nn.Module()
    out, _ = sdpa_packed_attention_forward(module, q, k, v, plan, scaling=0.3)  # (B, T, H, d)
    for row, segs in enumerate(lengths):
        start = 0
        for n in segs:
            span = slice(start, start + n)
            want = F.scaled_dot_product_attention(
                q[row : row + 1, :, span],
                k[row : row + 1, :, span],
                v[row : row + 1, :, span],
                is_causal=True,
                scale=0.3,
                enable_gqa=True,
            )[0].transpose(0, 1)  # (n, H, d)
            # Same kernel on the same rows; only the batch layout differs (fp32 rounding, ~1e-7).
            torch.testing.assert_close(out[row, span], want, atol=1e-6, rtol=0)
            start += n


@pytest.mark.parametrize("left", [False, True])
def test_unpacked_padded_batch_equals_sdpa(tiny_model, samples, left):
    """Left- or right-padded batches with an attention mask: exactly transformers' sdpa (it is called)."""
    batch = collate(samples, left=left)
    ours, _ = run(tiny_model, SDPA_PACKED, batch)
    ref, _ = run(tiny_model, "sdpa", batch)
    torch.testing.assert_close(ours.logits, ref.logits, atol=0, rtol=0)  # the same function runs


def test_batched_greedy_generate_equals_sdpa(tiny_model, samples):
    """Left-padded generate with a KV cache: the same tokens as sdpa."""
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = collate(samples, left=True)
    with torch.no_grad():
        tiny_model.set_attn_implementation(SDPA_PACKED)
        ours = tiny_model.generate(**batch, **kwargs)
        tiny_model.set_attn_implementation("sdpa")
        ref = tiny_model.generate(**batch, **kwargs)
    assert torch.equal(ours, ref)
