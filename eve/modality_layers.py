"""EVEv2's divide-and-conquer decoder layers: image tokens through visual copies, text through the LLM's.

Every decoder layer keeps the LLM's own modules (same names, same checkpoint keys) for text tokens and
holds, under `visual`, copies of the parts listed in `EveConfig.modality_split` for image tokens:

    "layernorm"  visual.input_layernorm, visual.post_attention_layernorm
    "self_attn"  visual.q_proj, visual.k_proj, visual.v_proj, visual.o_proj
    "mlp"        visual.mlp

Attention itself is one joint causal attention over all tokens (queries, keys and values of both
modalities together, one KV cache); the embeddings, final norm and LM head are shared.

The official code runs both branches on every token and mixes them with a 0/1 mask,
`raw(x) * (1 - m) + visual(x) * m`. Here each token runs only its own branch: the rows of each modality
are gathered (`ModalityRouting.split`), each branch runs on its rows, and one gather by the inverse
permutation puts them back (`merge`). Same numbers, half the projection and MLP FLOPs. A batch without
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


@dataclass(frozen=True)
class ModalityRouting:
    """Which tokens of a (B, T) batch are image tokens, as gather indices built once per forward."""

    text_rows: torch.Tensor
    """(N_t,) rows of the flattened (B*T) tokens that are text (padding included)."""
    image_rows: torch.Tensor
    """(N_v,) rows that are image tokens (CLS, patches, SPL)."""
    inverse: torch.Tensor
    """(B*T,) row of each token in cat([text rows, image rows])."""

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
        return cls(text_rows, image_rows, inverse)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> text rows (N_t, D), image rows (N_v, D)."""
        flat = x.flatten(0, 1)
        return flat.index_select(0, self.text_rows), flat.index_select(0, self.image_rows)

    def merge(self, text: torch.Tensor, image: torch.Tensor, batch_shape: torch.Size) -> torch.Tensor:
        """Text rows (N_t, D') and image rows (N_v, D') back in token order: (B, T, D')."""
        return torch.cat([text, image]).index_select(0, self.inverse).view(*batch_shape, -1)


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

    def _routed(
        self, routing: ModalityRouting | None, x: torch.Tensor, names: tuple[str, ...]
    ) -> list[torch.Tensor]:
        """Apply the modules `names` to x, each token through its modality's copy where one exists."""
        text = self.text_modules()
        if routing is None or not hasattr(self.visual, names[0]):
            return [text[name](x) for name in names]
        x_text, x_image = routing.split(x)  # one gather shared by the modules (q, k and v read the same rows)
        return [
            routing.merge(text[name](x_text), getattr(self.visual, name)(x_image), x.shape[:-1])
            for name in names
        ]

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
        """(B, T, D) -> (B, T, D): the LLM layer's computation with routed norms, projections and MLP."""
        route, attn = modality_routing, self.self_attn
        residual = hidden_states
        (x,) = self._routed(route, hidden_states, ("input_layernorm",))
        q, k, v = self._routed(route, x, ("q_proj", "k_proj", "v_proj"))
        batch_shape = x.shape[:-1]
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
        out = out.reshape(*batch_shape, -1).contiguous()
        (out,) = self._routed(route, out, ("o_proj",))
        hidden_states = residual + out

        residual = hidden_states
        (x,) = self._routed(route, hidden_states, ("post_attention_layernorm",))
        (x,) = self._routed(route, x, ("mlp",))
        return residual + x


def split_decoder_layers(decoder: nn.Module, parts: list[str]) -> None:
    """Replace every layer of a LlamaModel/Qwen2Model by a ModalityDecoderLayer splitting `parts`."""
    decoder.layers = nn.ModuleList(ModalityDecoderLayer(layer, list(parts)) for layer in decoder.layers)
