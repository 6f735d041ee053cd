"""The connectors against hand arithmetic, hand-written masks and dense loop-built references."""

import math

import pytest
import torch
import torch.nn.functional as F

from eve.connectors import (
    CONNECTOR_PRESETS,
    ConnectorConfig,
    LayerMerge,
    build_connector,
    pargo_cascade_mask,
    pargo_cross_mask,
    pargo_self_mask,
    sva_window_index,
)

# Tiny configurations of every connector (encoder widths 8..32, grids up to 8 x 8, LLM width 64).
TINY = {
    "mlp2x_gelu": dict(connector="mlp2x_gelu", llm_hidden=64, encoder_widths=(32,), encoder_grids=((4, 4),)),
    "comm": dict(
        connector="comm",
        llm_hidden=64,
        encoder_widths=(32, 24),
        encoder_grids=((4, 4), (4, 4)),
        encoder_layers=(4, 2),
    ),
    "comm_clip_only": dict(
        connector="comm", llm_hidden=64, encoder_widths=(32,), encoder_grids=((4, 4),), encoder_layers=(3,)
    ),
    "mof_interleaved": dict(
        connector="mof_interleaved", llm_hidden=64, encoder_widths=(32, 24), encoder_grids=((4, 4),) * 2
    ),
    "mof_additive": dict(
        connector="mof_additive",
        llm_hidden=64,
        encoder_widths=(32, 24),
        encoder_grids=((4, 4),) * 2,
        mof_alpha=0.3,
    ),
    "sva": dict(
        connector="sva",
        llm_hidden=64,
        encoder_widths=(8, 12, 16),
        encoder_grids=((2, 2), (4, 4), (2, 6)),  # windows 1 x 1, 2 x 2 and 1 x 3 (rectangular)
        sva_width=32,
        sva_heads=4,
        sva_depth=2,
        sva_query_grid=(2, 2),
    ),
    "pargo": dict(
        connector="pargo",
        llm_hidden=64,
        encoder_widths=(32,),
        encoder_grids=((2, 4),),  # 8 patches, blocks of 2
        pargo_partial=4,
        pargo_global=2,
        pargo_width=32,
        pargo_heads=4,
        pargo_ffn=64,
        pargo_layers=2,
    ),
}

TINY["pargo_without_cascade"] = {**TINY["pargo"], "pargo_cascade": False}  # the released layers alone
TINY["sva_first_context"] = {**TINY["sva"], "sva_context": "first"}  # the released code's context

# Reference vs module in fp32 with activations O(1) (see randomize): they only sum in other orders
# (gathered windows vs a dense masked softmax, SDPA vs explicit per-head loops), so differences are
# rounding (~1e-6); 1e-5 is a 10x margin, while a wrong window, mask or block moves values by O(0.1).
ATOL, RTOL = 1e-5, 1e-5


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorms too), matrices at 1/sqrt(fan_in) so activations stay O(1)."""
    torch.manual_seed(seed)
    for param in module.parameters():
        std = param[0].numel() ** -0.5 if param.ndim > 1 else 0.5
        torch.nn.init.normal_(param, std=std)
    return module


def make_features(cfg: ConnectorConfig, batch: int = 2, seed: int = 1, dtype=torch.float32):
    """Random [[(B, h*w, C_e)] * layers] per encoder."""
    gen = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(batch, h * w, width, generator=gen).to(dtype) for _ in range(n)]
        for width, (h, w), n in zip(cfg.encoder_widths, cfg.encoder_grids, cfg.encoder_layers)
    ]


def linear(i: int, o: int, bias: bool = True) -> int:
    """Parameters of nn.Linear(i, o)."""
    return i * o + (o if bias else 0)


LN = 2  # a LayerNorm of width C holds 2 * C parameters (weight and bias)


def expected_sva_params() -> int:
    """Cambrian-1 preset by hand: C = 1024, D = 4096, encoders 1152/1024/1536/5760, 3 layers."""
    c, d = 1024, 4096
    projs = sum(linear(w, c) + linear(c, c) + LN * c for w in (1152, 1024, 1536, 5760))  # MLP + LN
    queries = 24 * 24 * c
    per_encoder_kv = 2 * (LN * c + c * c)  # k and v: LayerNorm + Linear without bias
    layer = (
        c * c  # context projection
        + 2 * c * c  # in projection of [query, context]
        + LN * c
        + c * c  # query LayerNorm + Linear
        + 4 * per_encoder_kv
        + c * c  # output projection
        + LN * c  # norm
        + 2 * c * c  # MLP, no biases
        + 16 * c  # window positions of the 96 x 96 encoder only (4 x 4 slots); 1 x 1 windows have none
    )
    return projs + queries + 3 * layer + linear(c, d) + linear(d, d)


def expected_pargo_params() -> int:
    """ParGo preset by hand: H = 512, FFN 2048, 4 layers, encoder 1024, 304 queries, D = 4096."""
    h, ffn, enc, d, n_q = 512, 2048, 1024, 4096, 304
    embed = n_q * h + n_q * h + LN * h  # queries, positions, LayerNorm
    self_attn = 4 * linear(h, h) + LN * h  # q, k, v, o + post-norm
    cross_attn = 2 * linear(h, h) + 2 * linear(enc, h) + LN * h  # q, o from H; k, v from the encoder
    ffn_block = linear(h, ffn) + linear(ffn, h) + LN * h
    cascade = 4 * linear(h, h) + LN * h
    return embed + 4 * (cascade + self_attn + cross_attn + ffn_block) + linear(h, d)


def expected_comm_params() -> int:
    """COMM preset by hand: LLN-Layerscale over 24 CLIP + 6 DINOv2 layers of 1024, MLP, Linear(2048, 4096)."""
    c = 1024
    lln = linear(c, c) + LN * c  # per layer: Linear + LayerNorm
    clip = 24 * lln + 24  # + one weight logit per layer
    dino = 6 * lln + 6 + 2 * linear(c, c)  # + MLP Linear - GELU - Linear
    return clip + dino + linear(2 * c, 4096)


PRESET_FIGURES = {
    # LLaVA-1.5: 24 x 24 = 576 tokens; 1024*4096 + 4096 + 4096*4096 + 4096.
    "llava-1.5": (576, 1024 * 4096 + 4096 + 4096 * 4096 + 4096),
    "comm": (16 * 16, expected_comm_params()),
    # MoF: two mlp2x_gelu of 1024 -> 4096; interleaved 2 * 576 = 1,152 tokens, additive 576.
    "mof-interleaved": (1152, 2 * (1024 * 4096 + 4096 + 4096 * 4096 + 4096)),
    "mof-additive": (576, 2 * (1024 * 4096 + 4096 + 4096 * 4096 + 4096)),
    "cambrian-1": (576, expected_sva_params()),
    "pargo": (288 + 16, expected_pargo_params()),
}


@pytest.mark.parametrize("name", sorted(CONNECTOR_PRESETS))
def test_presets_at_real_size_on_meta(name):
    tokens, params = PRESET_FIGURES[name]
    cfg = ConnectorConfig.from_preset(name)
    with torch.device("meta"):
        module = build_connector(cfg)
        out = module(make_features(cfg, batch=2))  # shapes only: meta tensors hold no data
    assert module.num_tokens(cfg.encoder_grids) == tokens
    assert sum(p.numel() for p in module.parameters()) == params
    assert out.shape == (2, tokens, cfg.llm_hidden)


def test_pargo_masks_small_case():
    # 8 patches, 4 partial + 2 global queries, 2 layers: blocks of 8 / 4 = 2 patches, k = 4 / 2 = 2.
    cross = [
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ]
    self_ = [
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 1, 1],
    ]
    depth1 = [  # k * 1 = 2 nearest, itself included; token 1's tie (0 or 2) goes to the lower index
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 1],
    ]
    assert pargo_cross_mask(4, 2, 8).tolist() == [[bool(v) for v in row] for row in cross]
    assert pargo_self_mask(4, 2).tolist() == [[bool(v) for v in row] for row in self_]
    assert pargo_cascade_mask(4, 1, 2).tolist() == [[bool(v) for v in row] for row in depth1]
    assert pargo_cascade_mask(4, 2, 2).all()  # k * d = n_p: every partial token sees all
    # 8 partial tokens, 2 layers, depth 1: windows of 4, two to the left of i and one to the right.
    depth1_of_8 = [
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
    assert pargo_cascade_mask(8, 1, 2).tolist() == [[bool(v) for v in row] for row in depth1_of_8]


def test_sva_window_assignment():
    small = sva_window_index((24, 24), (24, 24))  # 1 x 1 windows: query (i, j) sees position i*24 + j
    assert small.shape == (576, 1)
    assert small[0].tolist() == [0]
    assert small[2 * 24 + 5].tolist() == [53]
    assert small[575].tolist() == [575]
    large = sva_window_index((96, 96), (24, 24))  # 4 x 4 windows
    assert large.shape == (576, 16)
    assert large[0].tolist() == [0, 1, 2, 3, 96, 97, 98, 99, 192, 193, 194, 195, 288, 289, 290, 291]
    # query (1, 2): rows 4..7, columns 8..11
    assert large[1 * 24 + 2].tolist() == [r * 96 + c for r in (4, 5, 6, 7) for c in (8, 9, 10, 11)]
    # query (23, 23): the bottom-right window, rows and columns 92..95
    assert large[575].tolist() == [r * 96 + c for r in (92, 93, 94, 95) for c in (92, 93, 94, 95)]
    # a rectangular 4 x 6 grid under a 2 x 3 query grid: 2 x 2 windows
    rect = sva_window_index((4, 6), (2, 3))
    assert rect.tolist() == [
        [0, 1, 6, 7],
        [2, 3, 8, 9],
        [4, 5, 10, 11],
        [12, 13, 18, 19],
        [14, 15, 20, 21],
        [16, 17, 22, 23],
    ]


def test_sva_rejects_a_grid_that_is_not_a_multiple():
    with pytest.raises(
        ValueError, match="encoder 1 grid 20x20 is not a whole multiple of the query grid 24x24"
    ):
        ConnectorConfig.from_preset("cambrian-1", encoder_grids=((24, 24), (20, 20), (24, 24), (96, 96)))


def test_features_are_checked():
    module = build_connector(ConnectorConfig(**TINY["mlp2x_gelu"]))
    with pytest.raises(
        ValueError, match=r"Encoder 0 layer 0: features of shape \(2, 15, 32\), expected \(2, 16, 32\)"
    ):
        module([[torch.zeros(2, 15, 32)]])


def test_mof_interleaving_order_and_additive_mix():
    cfg = ConnectorConfig(**TINY["mof_interleaved"])
    module = randomize(build_connector(cfg)).eval()
    features = make_features(cfg)
    a = module.projs[0](features[0][0])  # (B, 16, D) CLIP tokens
    b = module.projs[1](features[1][0])  # (B, 16, D) DINOv2 tokens
    out = module(features)
    assert out.shape == (2, 32, 64)
    manual = torch.empty(2, 32, 64)
    for t in range(16):  # clip_0, dino_0, clip_1, dino_1, ...
        manual[:, 2 * t] = a[:, t]
        manual[:, 2 * t + 1] = b[:, t]
    torch.testing.assert_close(out, manual, rtol=0, atol=0)

    additive = build_connector(ConnectorConfig(**TINY["mof_additive"]))
    additive.load_state_dict(module.state_dict())
    torch.testing.assert_close(additive(features), 0.3 * a + 0.7 * b)


@pytest.mark.parametrize("merge", ["mean", "mean_top_half", "layerscale", "lln_layerscale"])
def test_comm_merge_options(merge):
    torch.manual_seed(0)
    z = [torch.randn(2, 3, 5) for _ in range(4)]  # 4 layers of (B, N, C)
    module = randomize(LayerMerge(merge, 4, 5))
    if merge in ("layerscale", "lln_layerscale"):
        with torch.no_grad():
            module.logits.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))  # softmax = 0.1, 0.2, 0.3, 0.4
    if merge == "mean":
        expected = (z[0] + z[1] + z[2] + z[3]) / 4
    elif merge == "mean_top_half":
        expected = (z[2] + z[3]) / 2  # layers 3 and 4 of 4
    elif merge == "layerscale":
        expected = 0.1 * z[0] + 0.2 * z[1] + 0.3 * z[2] + 0.4 * z[3]
    else:
        expected = 0
        for i, weight in enumerate([0.1, 0.2, 0.3, 0.4]):
            lin, norm = module.linears[i], module.norms[i]
            y = z[i] @ lin.weight.T + lin.bias
            y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 1e-5)
            expected = expected + weight * (y * norm.weight + norm.bias)
    torch.testing.assert_close(module(z), expected, rtol=RTOL, atol=ATOL)  # O(1) values, rounding only


def dense_attention(q, k, v, mask, heads):
    """Per-head softmax(q k^T / sqrt(hd)) v over (B, T, C) x (B, S, C) with a (T, S) bool mask."""
    hd = q.shape[-1] // heads
    out = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(hd)  # (B, T, S)
        out.append(logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v[..., sl])
    return torch.cat(out, -1)


def test_sva_windowed_attention_equals_dense_reference():
    cfg = ConnectorConfig(**TINY["sva"])
    module = randomize(build_connector(cfg))
    features = make_features(cfg)
    (qh, qw), heads = cfg.sva_query_grid, cfg.sva_heads
    feats = [proj(layers[0]) for proj, layers in zip(module.encoder_projs, features)]
    context = sum(f.mean(1) for f in feats) / len(feats)  # sva_context "all"
    masks, slots = [], []
    for h, w in cfg.encoder_grids:  # dense (Q, N_e) visibility and each position's window slot, by loops
        sh, sw = h // qh, w // qw
        mask, slot = torch.zeros(qh * qw, h * w, dtype=torch.bool), torch.zeros(h * w, dtype=torch.long)
        for r in range(h):
            for c in range(w):
                mask[(r // sh) * qw + c // sw, r * w + c] = True
                slot[r * w + c] = (r % sh) * sw + c % sw
        masks.append(mask)
        slots.append(slot)
    mask = torch.cat(masks, dim=1)  # (Q, sum N_e)
    x = module.queries.expand(2, -1, -1)
    for layer in module.layers:
        ctx = layer.context_proj(context)[:, None].expand(-1, qh * qw, -1)
        y = layer.in_proj(torch.cat([x, ctx], -1))
        keys, values = [], []
        for e, f in enumerate(feats):
            kv = f + layer.pos[str(e)][slots[e]] if str(e) in layer.pos else f
            keys.append(layer.k_projs[e](layer.k_norms[e](kv)))
            values.append(layer.v_projs[e](layer.v_norms[e](kv)))
        q = layer.q_proj(layer.q_norm(y))
        y = y + layer.o_proj(dense_attention(q, torch.cat(keys, 1), torch.cat(values, 1), mask, heads))
        x = x + layer.mlp(layer.norm(y))
    torch.testing.assert_close(module(features), module.out(x), rtol=RTOL, atol=ATOL)


def test_pargo_equals_dense_masked_reference():
    cfg = ConnectorConfig(**TINY["pargo"])
    module = randomize(build_connector(cfg))
    features = make_features(cfg)
    patches = features[0][0]
    n_p, n_g, n_patches, layers = 4, 2, 8, 2
    cross = torch.zeros(n_p + n_g, n_patches, dtype=torch.bool)
    self_ = torch.zeros(n_p + n_g, n_p + n_g, dtype=torch.bool)
    for i in range(n_p + n_g):
        for p in range(n_patches):
            cross[i, p] = i >= n_p or p // 2 == i
        for j in range(n_p + n_g):
            self_[i, j] = (i < n_p) == (j < n_p)

    def cascade(depth):
        size = n_p // layers * depth
        mask = torch.zeros(n_p, n_p, dtype=torch.bool)
        for i in range(n_p):
            start = min(max(i - size // 2, 0), n_p - size)
            mask[i, start : start + size] = True
        return mask

    def attention(block, x, ctx, mask):
        out = dense_attention(block.q(x), block.k(ctx), block.v(ctx), mask, cfg.pargo_heads)
        return F.layer_norm(x + block.o(out), (x.shape[-1],), block.norm.weight, block.norm.bias, eps=1e-12)

    x = module.embed_norm(module.queries + module.pos).expand(2, -1, -1)
    for depth, layer in enumerate(module.layers, start=1):
        part = attention(module.cascade[depth - 1], x[:, :n_p], x[:, :n_p], cascade(depth))
        x = torch.cat([part, x[:, n_p:]], 1)
        x = attention(layer.cross_attn, attention(layer.self_attn, x, x, self_), patches, cross)
        x = layer.ffn_norm(x + layer.ffn(x))
    torch.testing.assert_close(module(features), module.out(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", sorted(TINY))
def test_gradients_reach_every_parameter(name):
    cfg = ConnectorConfig(**TINY[name])
    module = build_connector(cfg)
    out = module(make_features(cfg))
    assert out.shape == (2, module.num_tokens(cfg.encoder_grids), 64)
    # A random weighting of the outputs, not a plain sum, so that no gradient cancels by symmetry.
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None, pname
        assert param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", sorted(TINY))
def test_bf16_matches_fp32(name):
    cfg = ConnectorConfig(**TINY[name])
    module = randomize(build_connector(cfg))
    reference = module(make_features(cfg))
    out = module.to(torch.bfloat16)(make_features(cfg, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); the inputs, weights and every layer
    # round, which measured 0.4-0.7% of the output scale over these connectors: 2% is a 3x margin,
    # while a step left out or done twice in the bf16 path moves outputs by tens of percent.
    scale = reference.abs().max()
    assert (out.float() - reference).abs().max() <= 0.02 * scale
