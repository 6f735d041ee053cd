"""Collation: packed rows == one-by-one on the real tiny model; labels, positions, image order, planner."""

import numpy as np
import pytest
import torch
from PIL import Image

from eve.configuration_eve import IGNORE_INDEX
from train.packing import Collator, DummyImage, pack_rows, plan_batches


def test_pack_rows_capacity_and_cover():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = pack_rows(lengths, 128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    # best-fit decreasing is within a few rows of the volume bound here
    assert len(rows) <= int(np.ceil(sum(lengths) / 128)) + 3


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("budget", [dict(batch_size=7), dict(tokens_per_batch=512)])
def test_plan_batches_cover_each_sample_once(packing, budget):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 128, size=300).tolist()
    batches = plan_batches(lengths, max_length=128, packing=packing, **budget)
    flat = sorted(i for b in batches for r in b for i in r)
    assert flat == list(range(300))
    for b in batches:
        if "batch_size" in budget:
            assert sum(len(r) for r in b) <= 7
        elif packing:
            assert len(b) <= 512 // 128 and all(sum(lengths[i] for i in r) <= 128 for r in b)
        else:
            assert len(b) * max(lengths[r[0]] for r in b) <= 512


def _fake(n, img=None, first_label=IGNORE_INDEX):
    s = {"input_ids": list(range(1, n + 1)), "labels": [first_label] + list(range(101, 100 + n))}
    if img is not None:
        h, w = img
        s["input_ids"][1 : 2 + h * (w + 1)] = [-200] * (1 + h * (w + 1))
        s["pixel_values"] = torch.full((h * w * 4, 12), float(n))
        s["image_grid_hw"] = torch.tensor([[h, w]])
        s["teacher_pixel_values"] = torch.full((1, 3, 8, 8), float(n))
        s["teacher_image_boxes"] = torch.tensor([[0, 0, 8, n]])
    return s


def test_packed_layout_labels_positions_images():
    a, b, c = _fake(10, (1, 2)), _fake(5), _fake(12, (2, 2))
    col = Collator(pad_token_id=0, packing=True, pad_to_multiple_of=8, num_teacher_views=1)
    batch = col([[a, b], [c]])
    assert batch["input_ids"].shape == (2, 16) and "attention_mask" not in batch
    # labels copied unchanged (every sample's label 0 is already -100, as the processor makes it)
    assert (
        batch["labels"][0, :10].tolist() == a["labels"] and batch["labels"][0, 10:15].tolist() == b["labels"]
    )
    assert batch["labels"][0, 15].item() == IGNORE_INDEX and batch["labels"][1, 12:].eq(IGNORE_INDEX).all()
    assert batch["position_ids"][0].tolist() == [*range(10), *range(5), 0]
    assert batch["position_ids"][1].tolist() == [*range(12), *range(4)]
    # images in token-run order: row 0 (sample a) then row 1 (sample c)
    assert batch["image_grid_hw"].tolist() == [[1, 2], [2, 2]]
    assert batch["pixel_values"][:8].eq(10).all() and batch["pixel_values"][8:].eq(12).all()
    assert batch["teacher_pixel_values"].shape == (2, 3, 8, 8)
    assert batch["teacher_image_boxes"].tolist() == [[0, 0, 8, 10], [0, 0, 8, 12]]


def test_padded_layout():
    a, b = _fake(10, (1, 2)), _fake(5)
    batch = Collator(packing=False, pad_to_multiple_of=1)([a, b])
    assert batch["attention_mask"].tolist() == [[1] * 10, [1] * 5 + [0] * 5]
    assert batch["labels"][1].tolist() == b["labels"] + [IGNORE_INDEX] * 5
    assert "position_ids" not in batch


def test_packed_first_label_is_masked():
    # A label at a sample's first position would be predicted from the previous sample: masked.
    a, b = _fake(4), _fake(4, first_label=7)
    batch = Collator(packing=True, pad_to_multiple_of=1)([[a, b]])
    assert batch["labels"][0, 4].item() == IGNORE_INDEX


def test_dummy_image_for_text_only_batch():
    dummy = DummyImage(patch_dim=12, conv_stride=2, teacher_sizes=[8])
    for packing in (True, False):
        col = Collator(packing=packing, dummy_image=dummy, num_teacher_views=1, pad_to_multiple_of=1)
        batch = col([[_fake(5)], [_fake(6)]])
        assert batch["image_grid_hw"].tolist() == [[1, 1]] and batch["pixel_values"].shape == (4, 12)
        assert batch["teacher_image_boxes"].tolist() == [[0, 0, 0, 0]]
        assert (batch["input_ids"] == -200).sum().item() == 3
        assert batch["labels"][batch["input_ids"] == -200].eq(IGNORE_INDEX).all()
    # batches that already hold an image are unchanged
    assert Collator(dummy_image=dummy)([[_fake(10, (1, 2))]])["image_grid_hw"].tolist() == [[1, 2]]


def _samples(processor):
    rng = np.random.default_rng(0)
    convs = []
    for k, (h, w) in enumerate([(32, 32), (20, 32), (32, 9), (0, 0), (17, 25), (0, 0)]):
        q = "What is shown here?" if k % 2 else "Describe the colours and the shapes in detail."
        turns = [
            {"from": "human", "value": ("<image>\n" if h else "") + q},
            {"from": "gpt", "value": "A red circle " * (k + 1)},
        ]
        if k == 3:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing more."}]
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) if h else None
        convs.append(processor.encode(turns, img, template="vicuna_v1"))
    return convs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_one_by_one(tiny_model, processor, attn):
    # Reference: each sample alone (no padding, no packing); the batch loss is the mean CE over all
    # supervised tokens = sum_i loss_i * n_i / sum_i n_i. fp32 on CPU: masked vs unmasked softmax and
    # different summation orders differ by ~1e-7 relative; 2e-5 absolute leaves margin.
    tiny_model.set_attn_implementation(attn)
    samples = _samples(processor)
    assert all(s["labels"][0] == IGNORE_INDEX for s in samples)
    col_packed = Collator(pad_token_id=processor.pad_token_id, packing=True)
    col_padded = Collator(pad_token_id=processor.pad_token_id, packing=False)
    with torch.no_grad():
        num, den = 0.0, 0
        for s in samples:
            out = tiny_model(**col_padded([s]))
            num += out.loss.item() * out.n_loss_tokens
            den += int(out.n_loss_tokens)
        rows = [[samples[0], samples[3], samples[1]], [samples[2], samples[4], samples[5]]]
        packed = tiny_model(**col_packed(rows))
        padded = tiny_model(**col_padded(samples))
    assert int(packed.n_loss_tokens) == den == int(padded.n_loss_tokens)
    assert abs(packed.loss.item() - num / den) < 2e-5
    assert abs(padded.loss.item() - num / den) < 2e-5


def test_packed_image_hidden_states_equal_one_by_one(tiny_model, processor):
    # The PAL input (patch tokens gathered by hooks) is the same packed or alone: fp32, 1e-5.
    samples = [s for s in _samples(processor) if "pixel_values" in s]
    col = Collator(pad_token_id=processor.pad_token_id, packing=True)
    with torch.no_grad():
        alone = [tiny_model(**col([s]), image_hidden_layers=[2, 0]).image_hidden_states for s in samples]
        packed = tiny_model(**col([samples]), image_hidden_layers=[2, 0]).image_hidden_states
    for layer in range(2):
        torch.testing.assert_close(packed[layer], torch.cat([a[layer] for a in alone]), atol=1e-5, rtol=1e-5)


def test_one_row_equals_packed_rows_with_segment_attention(tiny_model, processor):
    # The same samples as two packed rows (a padded tail on the shorter) or as one row end to end:
    # with "sdpa_packed" every token attends within its own sample either way, so the loss and the
    # PAL input agree (fp32, 1e-5), and the single row carries no tail beyond the multiple of 8.
    tiny_model.set_attn_implementation("sdpa_packed")
    samples = _samples(processor)
    rows = [[samples[0], samples[3], samples[1]], [samples[2], samples[4], samples[5]]]
    two = Collator(pad_token_id=processor.pad_token_id, packing=True)(rows)
    one = Collator(pad_token_id=processor.pad_token_id, packing=True, one_row=True)(rows)
    total = sum(len(s["input_ids"]) for s in samples)
    assert one["input_ids"].shape == (1, -(-total // 8) * 8) and two["input_ids"].shape[0] == 2
    with torch.no_grad():
        a = tiny_model(**two, image_hidden_layers=[2, 0])
        b = tiny_model(**one, image_hidden_layers=[2, 0])
    assert int(a.n_loss_tokens) == int(b.n_loss_tokens)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    for layer in range(2):
        torch.testing.assert_close(
            a.image_hidden_states[layer], b.image_hidden_states[layer], atol=1e-5, rtol=1e-5
        )
