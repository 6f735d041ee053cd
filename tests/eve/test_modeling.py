"""EveForCausalLM against independent references: plain Llama, one-by-one runs, full hidden states."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from eve import EveConfig, EveForCausalLM
from eve.patch_embedding import patchify
from tests.conftest import force_reply

# Tolerances. "Same ops, same rows" comparisons (batched vs alone, packed vs separate, padded vs
# not) differ only by the summation order of matmuls/attention over different shapes: fp32 values
# of O(1-10) after 2 layers agree to ~1e-6; we allow 1e-5. Exact paths (state-dict round trips,
# the same module called twice) use exact equality.
ATOL = 1e-5


def image_sample(
    config: EveConfig, prefix: list[int], size_px: tuple[int, int] | None, suffix: list[int], seed=0
):
    """(input_ids, pixel_values or None, grid or None) of one sample: prefix <image run> suffix."""
    if size_px is None:
        return prefix + suffix, None, None
    p, s = config.vision_patch_size, config.vision_conv_stride
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, *size_px, generator=g)
    h, w = size_px[0] // (p * s), size_px[1] // (p * s)
    run = [config.image_token_index] * config.num_image_tokens(h, w)
    return prefix + run + suffix, patchify(image, p, s), torch.tensor([[h, w]])


def collate(samples, pad_id: int = 0, left: bool = False):
    """Pad a list of samples into a batch (right padding unless left), images concatenated in order."""
    length = max(len(ids) for ids, _, _ in samples)
    input_ids = torch.full((len(samples), length), pad_id)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, (ids, _, _) in enumerate(samples):
        span = slice(length - len(ids), length) if left else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
    pixels = [px for _, px, _ in samples if px is not None]
    grids = [g for _, _, g in samples if g is not None]
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    if pixels:
        batch.update(pixel_values=torch.cat(pixels), image_grid_hw=torch.cat(grids))
    return batch


def llama_twin(model: EveForCausalLM) -> LlamaForCausalLM:
    """A transformers LlamaForCausalLM holding the same LLM weights."""
    text_fields = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    text_fields += ("num_key_value_heads", "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")
    text_fields += ("max_position_embeddings", "tie_word_embeddings", "rope_parameters")
    fields = {k: getattr(model.config, k) for k in text_fields}
    llama = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    missing, unexpected = llama.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}, strict=False
    )
    assert not missing and not unexpected
    return llama


def test_text_only_logits_equal_plain_llama(tiny_model):
    """With no image, EVE is exactly the Llama it holds."""
    llama = llama_twin(tiny_model)
    input_ids = torch.tensor([[1, 910, 338, 263, 1243], [1, 22172, 3303, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        ours = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits
        ref = llama(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # the same modules on the same inputs


def test_mixed_batch_equals_each_sample_alone(tiny_model, samples):
    """Images of different sizes and a text-only sample in one right-padded batch == one by one."""
    with torch.no_grad():
        batched = tiny_model(**collate(samples)).logits
        for row, sample in enumerate(samples):
            alone = tiny_model(**collate([sample])).logits[0]
            torch.testing.assert_close(batched[row, : alone.shape[0]], alone, atol=ATOL, rtol=0)


def test_image_features_replace_the_image_run(tiny_model, samples):
    """Embeddings at the run are exactly the PEL output; text positions are the token embeddings."""
    batch = collate(samples)
    with torch.no_grad():
        embeds = tiny_model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["image_grid_hw"])
        features = tiny_model.vision_tower(batch["pixel_values"], batch["image_grid_hw"])
    image_mask = batch["input_ids"] == tiny_model.config.image_token_index
    assert torch.equal(embeds[image_mask], features)
    text = tiny_model.model.embed_tokens(batch["input_ids"].clamp(min=0))
    assert torch.equal(embeds[~image_mask], text[~image_mask])


def test_placeholder_image_count_mismatch_raises(tiny_model, samples, tiny_config):
    """Runs that do not match the images given name what was expected."""
    batch = collate(samples)
    # 32x16 px -> 4x2 grid -> 1 + 4*3 = 13 tokens; 8x24 px -> 1x3 grid -> 1 + 1*4 = 5 tokens.
    with pytest.raises(ValueError, match=r"runs of lengths \[13, 5\].*but the 0 images given"):
        tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match=r"need runs of \[13\]"):  # only the first image given
        n_first = 4 * 2 * 4
        tiny_model(
            **{
                **batch,
                "pixel_values": batch["pixel_values"][:n_first],
                "image_grid_hw": batch["image_grid_hw"][:1],
            }
        )
    swapped = {**batch, "image_grid_hw": batch["image_grid_hw"].flip(0)}  # same total, wrong order
    swapped["pixel_values"] = torch.cat([samples[2][1], samples[0][1]])
    with pytest.raises(ValueError, match="1 \\+ h\\*\\(w\\+1\\) each"):
        tiny_model(**swapped)
    ids = torch.tensor([samples[1][0]])
    with pytest.raises(ValueError, match="0 image-token runs"):
        tiny_model(input_ids=ids, pixel_values=samples[0][1], image_grid_hw=samples[0][2])


def test_labels_give_mean_ce_over_supervised_tokens(tiny_model, samples):
    """loss == CE of the full logits at shifted labels != -100; the head is skipped elsewhere."""
    batch = collate(samples)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels = labels.masked_fill(labels == tiny_model.config.image_token_index, -100)
    labels[:, :2] = -100
    with torch.no_grad():
        out = tiny_model(**batch, labels=labels)
        logits = tiny_model(**batch).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert out.logits is None
    assert out.n_loss_tokens == (labels[:, 1:] != -100).sum()
    torch.testing.assert_close(out.loss, expected, atol=ATOL, rtol=0)
    nothing = tiny_model(**batch, labels=torch.full_like(labels, -100))
    assert nothing.loss == 0 and nothing.n_loss_tokens == 0


def pack_row(samples):
    """Samples concatenated into one row with restarting position_ids (no attention mask)."""
    ids = sum((s[0] for s in samples), [])
    position_ids = torch.cat([torch.arange(len(s[0])) for s in samples])[None]
    pixels = [s[1] for s in samples if s[1] is not None]
    grids = [s[2] for s in samples if s[2] is not None]
    return dict(
        input_ids=torch.tensor([ids]),
        position_ids=position_ids,
        pixel_values=torch.cat(pixels),
        image_grid_hw=torch.cat(grids),
    )


def test_packed_row_equals_separate_rows(tiny_model, samples):
    """A packed row (position_ids restart, attention_mask=None) gives each sample's own logits and loss."""
    packed = pack_row(samples)
    with torch.no_grad():
        logits = tiny_model(**packed).logits[0]
        start = 0
        for sample in samples:
            alone = tiny_model(**collate([sample])).logits[0]
            torch.testing.assert_close(logits[start : start + len(sample[0])], alone, atol=ATOL, rtol=0)
            start += len(sample[0])
        labels = packed["input_ids"].masked_fill(packed["input_ids"] < 0, -100)
        out = tiny_model(**packed, labels=labels)
        # Separate rows: per-sample sums of CE, then the token-weighted mean.
        total, count = 0.0, 0
        for sample in samples:
            batch = collate([sample])
            lab = batch["input_ids"].masked_fill(batch["input_ids"] < 0, -100)
            one = tiny_model(**batch, labels=lab)
            total, count = total + one.loss * one.n_loss_tokens, count + one.n_loss_tokens
    # The boundary token (last of one sample -> first of the next) is not supervised.
    assert out.n_loss_tokens == count
    torch.testing.assert_close(out.loss, total / count, atol=ATOL, rtol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_image_hidden_states_are_the_patch_rows_of_all_hidden_states(tiny_model, samples, checkpointing):
    """image_hidden_states[k] == hidden_states[layer_k] at patch positions; gradients flow (also with GC)."""
    batch = collate(samples)
    layers = [0, 1, 2, -1]  # 2 layers: 0 = spliced embeddings, 2 = -1 = after the final norm
    model = tiny_model
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states
    # Patch positions, built independently: walk each image's run of 1 + h*(w+1) tokens.
    rows = []
    grids = batch["image_grid_hw"].tolist()
    starts = [
        (b, t)
        for b in range(2 + 1)
        for t in range(batch["input_ids"].shape[1])
        if batch["input_ids"][b, t] == model.config.image_token_index
        and (t == 0 or batch["input_ids"][b, t - 1] != model.config.image_token_index)
    ]
    for (b, t), (h, w) in zip(starts, grids):
        rows += [(b, t + 1 + r * (w + 1) + c) for r in range(h) for c in range(w)]
    index_b, index_t = torch.tensor(rows).T

    model.train()
    if checkpointing:
        model.activation_checkpointing_enable()
    out = model(**batch, image_hidden_layers=layers)
    assert len(out.image_hidden_states) == len(layers)
    for k, states in zip(layers, out.image_hidden_states):
        assert states.shape == (len(rows), model.config.hidden_size)
        torch.testing.assert_close(states, full[k][index_b, index_t], atol=ATOL, rtol=0)
    sum(s.square().mean() for s in out.image_hidden_states).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "vision_tower.conv.weight" in grads and "model.layers.0.mlp.down_proj.weight" in grads
    assert "model.layers.1.self_attn.q_proj.weight" in grads  # through hidden state 2 (final norm)
    if checkpointing:  # recomputation must not duplicate or change anything: same grads as without GC
        model.activation_checkpointing_disable()
        model.zero_grad()
        ref = model(**batch, image_hidden_layers=layers)
        sum(s.square().mean() for s in ref.image_hidden_states).backward()
        for name, param in model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-4)


def test_eager_attention_matches_sdpa(tiny_config, samples):
    """The eager fallback gives the same numbers as the SDPA path (padded mixed batch)."""
    torch.manual_seed(0)
    sdpa = EveForCausalLM(tiny_config).eval()
    eager = EveForCausalLM._from_config(copy.deepcopy(tiny_config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.config._attn_implementation == "eager" and sdpa.config._attn_implementation == "sdpa"
    batch = collate(samples, left=True)
    valid = batch["attention_mask"].bool()  # fully masked pad rows hold backend-specific garbage
    with torch.no_grad():
        torch.testing.assert_close(
            eager(**batch).logits[valid], sdpa(**batch).logits[valid], atol=ATOL, rtol=0
        )


def test_save_pretrained_auto_model_round_trip(tmp_path, tiny_model, samples):
    """save_pretrained (safetensors) -> AutoModelForCausalLM.from_pretrained: identical weights and logits."""
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, EveForCausalLM)
    ours, theirs = tiny_model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit for bit
    batch = collate(samples)
    with torch.no_grad():
        # Loaded weights are memory-mapped at 8-byte alignment, so the CPU GEMM may take another
        # SIMD path than for 64-byte-aligned fresh tensors: results differ by ~1 ulp (3e-7 measured on
        # O(0.3) logits). Bitwise-equal weights are checked above; 1e-6 only admits that rounding.
        torch.testing.assert_close(loaded(**batch).logits, tiny_model(**batch).logits, atol=1e-6, rtol=0)


def test_batched_greedy_generate_equals_one_by_one(tiny_model, samples, tiny_config):
    """Left-padded batch with images and a text-only prompt: same greedy continuations as alone."""
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batch = collate(samples, left=True)
    with torch.no_grad():
        batched = tiny_model.generate(**batch, **kwargs)
        assert batched.shape == (3, batch["input_ids"].shape[1] + 6)
        for row, sample in enumerate(samples):
            alone = tiny_model.generate(**collate([sample]), **kwargs)[0, len(sample[0]) :]
            assert torch.equal(batched[row, -6:], alone), row
    assert torch.equal(batched[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # prompt + new tokens


def test_greedy_generate_stops_exactly_at_eos_or_max_new_tokens(tiny_model, samples):
    """A model whose next token is known (token 29889, then eos 2): exact lengths and pads, batch-wide."""
    model = force_reply(tiny_model, token=29889, eos=2)
    samples = [samples[0], (samples[1][0] + [29889], None, None), samples[2]]  # row 1 already ends in it
    batch = collate(samples, left=True)
    length = batch["input_ids"].shape[1]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=2)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, **kwargs)
        # Rows 0 and 2 say 29889 then eos; row 1 says eos at once and is padded while the others finish.
        assert out[:, length:].tolist() == [[29889, 2], [2, 0], [29889, 2]]
        out = model.generate(**batch, max_new_tokens=1, **kwargs)  # the limit comes before eos
        assert out[:, length:].tolist() == [[29889], [2], [29889]]
        t = 29889  # without an eos id the pattern repeats up to the limit
        out = model.generate(**batch, max_new_tokens=5, **{**kwargs, "eos_token_id": None})
        assert out[:, length:].tolist() == [[t, 2, t, 2, t], [2, t, 2, t, 2], [t, 2, t, 2, t]]


def test_sampling_generate_is_seeded(tiny_model, samples):
    """do_sample works with images and is reproducible under a seed."""
    batch = collate(samples, left=True)
    kwargs = dict(
        max_new_tokens=4, do_sample=True, top_k=50, temperature=1.0, pad_token_id=0, eos_token_id=None
    )
    torch.manual_seed(3)
    first = tiny_model.generate(**batch, **kwargs)
    torch.manual_seed(3)
    assert torch.equal(first, tiny_model.generate(**batch, **kwargs))


def test_from_llm_copies_the_llm(tmp_path, tiny_model):
    """from_llm(dir) and from_llm(model): text logits equal the source Llama; the PEL is initialised."""
    llama = llama_twin(tiny_model)
    llama.save_pretrained(tmp_path)
    vision = dict(vision_hidden_size=32, vision_num_heads=4, vision_patch_size=4, max_image_size=32)
    ids = torch.tensor([[1, 910, 338, 263, 1243]])
    for source in (tmp_path, llama):
        eve = EveForCausalLM.from_llm(source, **vision).eval()
        assert eve.config.vision_hidden_size == 32 and eve.config.hidden_size == llama.config.hidden_size
        with torch.no_grad():
            assert torch.equal(eve(input_ids=ids).logits, llama(input_ids=ids).logits)
        cls = eve.vision_tower.class_embedding
        assert torch.isfinite(cls).all() and 0.5 < cls.std() < 2  # official init: randn(C)


@pytest.mark.slow
def test_from_llm_reads_the_smollm2_gguf():
    """The embedded real LLM (SmolLM2-135M GGUF, tied embeddings): EVE text logits == the GGUF Llama."""
    from eve.assets import smollm2_gguf_path
    from eve.modeling_eve import _load_gguf_llama

    path = smollm2_gguf_path()
    vision = dict(vision_hidden_size=32, vision_num_heads=4, vision_patch_size=4, max_image_size=32)
    eve = EveForCausalLM.from_llm(path.parent, gguf_file=path.name, **vision).eval()
    assert (eve.config.hidden_size, eve.config.num_hidden_layers, eve.config.vocab_size) == (576, 30, 49152)
    assert eve.config.tie_word_embeddings and eve.lm_head.weight is eve.model.embed_tokens.weight
    llama = _load_gguf_llama(path.parent, path.name).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649]])
    with torch.no_grad():
        assert torch.equal(eve(input_ids=ids).logits, llama(input_ids=ids).logits)
