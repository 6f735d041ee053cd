"""EVEv2's divide-and-conquer decoder layers: image tokens through visual copies, text through the LLM's.

Every decoder layer keeps the LLM's own modules (same names, same checkpoint keys) for text tokens and
holds, under `visual`, copies of the parts listed in `EveConfig.modality_split` for image tokens:

    "layernorm"  visual.input_layernorm, visual.post_attention_layernorm
    "self_attn"  visual.q_proj, visual.k_proj, visual.v_proj, visual.o_proj
    "mlp"        visual.mlp

Attention itself is one joint causal attention over all tokens (queries, keys and values of both
modalities together, one KV cache); the embeddings, final norm and LM head are shared.

The official code runs both branches on every token and mixes them with a 0/1 mask,
`raw(x) * (1 - m) + visual(x) * m`. Here each token runs only its own branch: the residual stream is
permuted into text rows then image rows (`ModalityRouting.split`), each branch runs its norms,
projections, MLP and residual adds on its own rows, and the gather by the inverse permutation puts
tokens back in order (`merge`) only where attention needs them. Same numbers, half the projection and
MLP FLOPs. A batch without
image tokens (text-only prompts, every decoding step) has no routing: the layer is then the plain LLM layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

SPLIT_PARTS = {
    "layernorm": ("input_layernorm", "post_attention_layernorm"),
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("mlp",),
}
"""modality_split entry -> the modules it copies (attribute names of `VisualCopies`)."""


class _PermuteRows(torch.autograd.Function):
    """Rows of a (N, ...) tensor in the order `index`; the backward is the gather by `inverse`.

    autograd's own backward of `index_select` is an `index_add_` into zeros (a scatter), which on CPU
    costs several times the gather; for a permutation the gather by the inverse is exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


@dataclass(frozen=True)
class ModalityRouting:
    """Which tokens of a (B, T) batch are image tokens, as one permutation built once per forward."""

    order: torch.Tensor
    """(B*T,) the flattened tokens' rows, text rows (padding included) first, then image rows."""
    inverse: torch.Tensor
    """(B*T,) row of each token in `order`."""
    n_text: int
    """Number of text rows (the first n_text of `order`)."""

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor) -> ModalityRouting | None:
        """The routing of a (B, T) bool image-token mask; None when there is no image token."""
        flat = image_mask.flatten()
        image_rows = torch.nonzero(flat).flatten()
        if image_rows.numel() == 0:
            return None
        text_rows = torch.nonzero(~flat).flatten()
        order = torch.cat([text_rows, image_rows])  # (B*T,) a permutation
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return cls(order, inverse, text_rows.numel())

    @property
    def image_rows(self) -> torch.Tensor:
        """(N_v,) rows of the flattened tokens that are image tokens (CLS, patches, SPL)."""
        return self.order[self.n_text :]

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> text rows (N_t, D), image rows (N_v, D): one gather, two views."""
        rows = _PermuteRows.apply(x.flatten(0, 1), self.order, self.inverse)
        return rows[: self.n_text], rows[self.n_text :]

    def merge(self, text: torch.Tensor, image: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        """Text rows (N_t, D') and image rows (N_v, D') back in token order: (B, T, D')."""
        rows = _PermuteRows.apply(torch.cat([text, image]), self.inverse, self.order)
        return rows.view(*batch_shape, -1)


class VisualCopies(nn.Module):
    """The visual copies of one decoder layer's split parts (module names as in the LLM's layer)."""

    def __init__(self, layer: nn.Module, parts: list[str]):
        super().__init__()
        owners = {"layernorm": layer, "self_attn": layer.self_attn, "mlp": layer}
        for part in parts:
            for name in SPLIT_PARTS[part]:
                # A deep copy has the LLM's module type, shapes and biases (Qwen2: q/k/v with, o without).
                self.add_module(name, copy.deepcopy(getattr(owners[part], name)))


class ModalityDecoderLayer(GradientCheckpointingLayer):
    """A Llama/Qwen2 decoder layer whose split parts run image tokens through `visual`, text through the LLM's."""

    def __init__(self, layer: nn.Module, parts: list[str]):
        super().__init__()
        self.self_attn = layer.self_attn  # the LLM's attention module: text q/k/v/o, rotary-free settings
        self.mlp = layer.mlp
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm
        self.visual = VisualCopies(layer, parts)

    def text_modules(self) -> dict[str, nn.Module]:
        """The LLM's module of each name that `visual` may copy."""
        attn = self.self_attn
        return {
            "input_layernorm": self.input_layernorm,
            "post_attention_layernorm": self.post_attention_layernorm,
            **{name: getattr(attn, name) for name in SPLIT_PARTS["self_attn"]},
            "mlp": self.mlp,
        }

    @torch.no_grad()
    def init_visual_from_text(self) -> None:
        """Visual copies start as the LLM's weights (transformers' copy_ spares weights already loaded)."""
        from transformers import initialization as init

        text = self.text_modules()
        for name, visual in self.visual.named_children():
            for target, source in zip(visual.parameters(), text[name].parameters()):
                init.copy_(target, source)

    def visual_modules(self) -> dict[str, nn.Module]:
        """The module image tokens go through for each name: the visual copy, or the LLM's if not split."""
        return {name: getattr(self.visual, name, module) for name, module in self.text_modules().items()}

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        modality_routing: ModalityRouting | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """(B, T, D) -> (B, T, D): the LLM layer's computation, image tokens through their copies.

        With image tokens the residual stream is split into text and image rows once, each branch
        runs its norms, projections, residual adds and MLP on its own rows, and only the joint
        attention sees the tokens in order: two splits and four merges per layer.
        """
        route, attn = modality_routing, self.self_attn
        batch_shape = hidden_states.shape[:-1]
        if route is None:
            branches = [(hidden_states, self.text_modules())]
        else:
            branches = list(zip(route.split(hidden_states), (self.text_modules(), self.visual_modules())))

        def in_order(parts: list[torch.Tensor]) -> torch.Tensor:  # branch rows -> (B, T, D')
            return parts[0].view(*batch_shape, -1) if route is None else route.merge(*parts, batch_shape)

        projected = []
        for h, modules in branches:
            x = modules["input_layernorm"](h)
            projected.append([modules[name](x) for name in ("q_proj", "k_proj", "v_proj")])
        q, k, v = (in_order([p[i] for p in projected]) for i in range(3))
        q = q.view(*batch_shape, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(*batch_shape, -1, attn.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = v.view(*batch_shape, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, eager_attention_forward
        )
        out, _ = attention(
            attn,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else attn.attention_dropout,
            scaling=attn.scaling,
            sliding_window=getattr(attn, "sliding_window", None),  # Qwen2 only; Llama attention has none
            position_ids=position_ids,  # flash-attn varlen finds packed samples from restarting positions
            **kwargs,
        )  # (B, T, H, hd)
        out = out.reshape(*batch_shape, -1)
        outs = [out] if route is None else route.split(out)
        results = []
        for (h, modules), o in zip(branches, outs):
            h = h + modules["o_proj"](o)
            results.append(h + modules["mlp"](modules["post_attention_layernorm"](h)))
        return in_order(results)


def split_decoder_layers(decoder: nn.Module, parts: list[str]) -> None:
    """Replace every layer of a LlamaModel/Qwen2Model by a ModalityDecoderLayer splitting `parts`."""
    decoder.layers = nn.ModuleList(ModalityDecoderLayer(layer, list(parts)) for layer in decoder.layers)
