"""EveForCausalLM: a Llama or Qwen2 decoder (eve/backbones.py) that reads images through its vision front-end
(the patch embedding layer, PEL, EVEv2's patch embedding, or pretrained encoders + a connector:
eve/vision_frontends.py), optionally with EVEv2's divide-and-conquer layers (eve/modality_layers.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, LlamaModel, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from eve.attention import SDPA_PACKED  # noqa: F401  importing registers the "sdpa_packed" backend
from eve.backbones import build_backbone, load_llm, text_fields
from eve.backbones import load_gguf_llama as _load_gguf_llama  # noqa: F401  (its former home)
from eve.configuration_eve import IGNORE_INDEX, EveConfig
from eve.connectors import Connector
from eve.encoders import VisionEncoder
from eve.modality_layers import ModalityDecoderLayer, ModalityRouting, split_decoder_layers
from eve.patch_embedding import Eve2PatchEmbedding, EvePatchEmbedding, ImageLayout
from eve.vision_frontends import EncoderFrontend, build_frontend

logger = logging.getLogger(__name__)


def supervised_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T-1) bool: token t is trained to predict label t+1 (!= -100); the loss's one definition.

    position_ids: given for packed rows only (no attention mask); a sample's last token must then not
    predict the next sample's first one (where position_ids restart at 0).
    """
    supervised = labels[:, 1:] != IGNORE_INDEX
    if position_ids is not None:
        supervised &= position_ids.expand_as(labels)[:, 1:] != 0
    return supervised


@dataclass
class EveCausalLMOutputWithPast(ModelOutput):
    """Output of EveForCausalLM.forward."""

    loss: torch.Tensor | None = None
    """Mean cross-entropy over the supervised (shifted, != -100) tokens of the batch."""
    logits: torch.Tensor | None = None
    """(B, T', V) next-token logits; None when labels are given (the head runs at supervised rows only)."""
    past_key_values: Cache | None = None
    """The KV cache when use_cache."""
    hidden_states: tuple[torch.Tensor, ...] | None = None
    """All (B, T, D) hidden states when output_hidden_states (HF convention)."""
    attentions: tuple[torch.Tensor, ...] | None = None
    """Attention weights when output_attentions (eager attention only)."""
    n_loss_tokens: torch.Tensor | None = None
    """Number of supervised tokens averaged in loss (for exact token-weighted averaging across ranks)."""
    image_hidden_states: tuple[torch.Tensor, ...] | None = None
    """One (N, D) tensor per requested image_hidden_layers index: patch tokens only, image order, raster."""


class ImageHiddenStateCollector:
    """Forward hooks that keep only the image patch rows of chosen decoder layers, during one forward."""

    def __init__(self, model: LlamaModel, layers: list[int], patch_rows: torch.Tensor):
        n_layers = len(model.layers)
        self.order = [i % (n_layers + 1) if -(n_layers + 1) <= i <= n_layers else None for i in layers]
        if None in self.order:
            raise ValueError(
                f"image_hidden_layers {layers} out of range for {n_layers} layers (0..{n_layers})."
            )
        self.patch_rows = patch_rows  # (N,) rows of the flattened (B*T) sequence
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        for index in set(self.order):
            # HF index k >= 1 is the output of decoder layer k-1, except index L: after the final norm.
            if index == n_layers:
                module = model.norm
            elif index > 0:
                module = model.layers[index - 1]
            else:
                continue  # index 0 (the spliced embeddings) is taken before the decoder runs
            self.handles.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
            # transformers checkpoints a layer's `forward`, not `__call__`, so this hook runs once per
            # forward, outside the recomputation; the handles are also removed when forward returns, so a
            # checkpointing wrapper that re-ran hooks during backward could not add a second copy.
            hidden = output[0] if isinstance(output, tuple) else output
            self.add(index, hidden)

        return hook

    def add(self, index: int, hidden: torch.Tensor) -> None:
        """Keep the patch rows of a (B, T, D) hidden state."""
        self.states[index] = hidden.flatten(0, 1)[self.patch_rows]  # (N, D)

    def result(self) -> tuple[torch.Tensor, ...]:
        """The gathered states in the order they were asked for."""
        return tuple(self.states[i] for i in self.order)

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


class EveForCausalLM(PreTrainedModel, GenerationMixin):
    """EVE: decoder (Llama or Qwen2) + lm_head + vision front-end; image features replace image-token runs."""

    config_class = EveConfig
    config: EveConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "Qwen2DecoderLayer", "ModalityDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EveConfig):
        super().__init__(config)
        self.model = build_backbone(config)  # the LLM decoder (embeddings, layers, final norm)
        if config.modality_split:  # EVEv2: visual copies of the split parts in every layer
            split_decoder_layers(self.model, config.modality_split)
        self.vision_tower = build_frontend(config)  # PEL + projector, or encoders + connector
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ----------------------------------------------------------------------------------------------
    # Initialisation
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The one place that sets every starting value (the decoder submodel keeps the HF Llama/Qwen2 init;
        this runs on the whole model last, after it, and starts the visual layer copies as the LLM's)."""
        vision = {id(m) for m in self.vision_tower.modules()} if hasattr(self, "vision_tower") else set()
        if module is self:
            for layer in self.model.layers:
                if isinstance(layer, ModalityDecoderLayer):
                    layer.init_visual_from_text()
        elif isinstance(module, (EvePatchEmbedding, Eve2PatchEmbedding)):
            # Official EVE: CLS and SPL start as torch.randn(C).
            init.normal_(module.class_embedding, mean=0.0, std=1.0)
            init.normal_(module.split_embedding, mean=0.0, std=1.0)
        elif isinstance(module, VisionEncoder):
            # A pretrained encoder starts from its weights file, unless from_pretrained has loaded it.
            if not all(getattr(p, "_is_hf_initialized", False) for p in module.parameters()):
                module.load_source_weights()
        elif isinstance(module, Connector) and hasattr(module, "init_weights"):
            module.init_weights()  # the connector's own starting values (after its layers' defaults below)
        elif id(module) in vision and isinstance(module, (nn.Linear, nn.Conv2d)):
            # Official EVE builds the PEL and projector with PyTorch's default init, not N(0, 0.02).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight[0].numel()
                init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5)
        elif id(module) in vision and isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)  # lm_head: N(0, initializer_range)

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        """transformers' per-module init step, given every module: its shortcut for code outside transformers
        skips modules without parameters of their own (a pretrained encoder's wrapper among them), which
        _init_weights does not need (it only uses init functions that spare loaded weights)."""
        super()._initialize_weights(module, is_custom_code=False)

    def get_input_embeddings(self) -> nn.Embedding:
        """The LLM token embedding."""
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the LLM token embedding."""
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head."""
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        """Replace the LM head."""
        self.lm_head = value

    # ----------------------------------------------------------------------------------------------
    # Inputs
    def _check_image_runs(self, image_mask: torch.Tensor, image_grid_hw: torch.Tensor | None) -> None:
        """Raise a ValueError unless the image-token runs match the images' token counts (num_image_tokens)."""
        # Runs of image tokens, row by row; a False column between rows keeps runs from merging.
        flat = F.pad(image_mask, (0, 1)).flatten().to(torch.int8)
        edges = torch.diff(flat, prepend=flat.new_zeros(1))
        starts, ends = torch.nonzero(edges == 1).flatten(), torch.nonzero(edges == -1).flatten()
        got = (ends - starts).tolist()
        grid = [] if image_grid_hw is None else image_grid_hw.detach().to("cpu").tolist()
        want = [self.config.num_image_tokens(h, w) for h, w in grid]
        if got != want:
            raise ValueError(
                f"input_ids hold {len(got)} image-token runs of lengths {got} (sum {sum(got)}, id "
                f"{self.config.image_token_index}), but the {len(want)} images given (image_grid_hw {grid}) need "
                f"runs of {want} (sum {sum(want)}; {self.vision_tower.run_rule} each). Expand each <image> with EveProcessor and "
                "pass exactly the images of those placeholders, in order."
            )

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        layout: ImageLayout | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the vision front-end's output scattered into the image-token runs: (B, T, D)."""
        image_mask = input_ids == self.config.image_token_index  # (B, T)
        embeds = self.model.embed_tokens(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        has_images = pixel_values is not None and image_grid_hw is not None and image_grid_hw.shape[0] > 0
        if has_images or bool(image_mask.any()):
            self._check_image_runs(image_mask, image_grid_hw if has_images else None)
        if has_images:
            features = self.vision_tower(pixel_values, image_grid_hw, layout)  # (N_img_tokens, D)
            embeds = embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))
        return embeds

    # ----------------------------------------------------------------------------------------------
    # Forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        image_hidden_layers: list[int] | tuple[int, ...] | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> EveCausalLMOutputWithPast:
        """Splice images into the sequence, run the decoder, return logits or the supervised-token loss."""
        packed = attention_mask is None and position_ids is not None
        if use_cache is None:
            # transformers only builds the block-diagonal mask of packed rows without a cache.
            use_cache = self.config.use_cache and labels is None and not packed and not self.training
        has_images = pixel_values is not None and image_grid_hw is not None and image_grid_hw.shape[0] > 0
        layout = self.vision_tower.layout(image_grid_hw) if has_images else None
        if self.config.modality_split:
            if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
                raise NotImplementedError(
                    "output_hidden_states/output_attentions are not recorded by divide-and-conquer layers "
                    "(modality_split); gather hidden states with image_hidden_layers or forward hooks."
                )
            # Image tokens take the layers' visual copies; decoding steps and text-only batches have none.
            # (Without input_ids every token is taken as text.)
            image_mask = input_ids == self.config.image_token_index if input_ids is not None else None
            kwargs["modality_routing"] = (
                ModalityRouting.from_mask(image_mask) if image_mask is not None else None
            )
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("Pass input_ids (or inputs_embeds).")
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_grid_hw, layout)

        collector = None
        if image_hidden_layers:
            if input_ids is None or layout is None:
                raise ValueError(
                    "image_hidden_layers needs input_ids with image tokens, their pixel_values and the PEL "
                    "front-end (its patch positions are what it gathers)."
                )
            image_rows = torch.nonzero((input_ids == self.config.image_token_index).flatten()).flatten()
            collector = ImageHiddenStateCollector(
                self.model, list(image_hidden_layers), image_rows[layout.is_patch]
            )
            if 0 in collector.order:
                collector.add(0, inputs_embeds)
        try:
            outputs = self.model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        finally:
            if collector is not None:
                collector.remove()
        hidden = outputs.last_hidden_state  # (B, T, D)

        loss = logits = n_loss_tokens = None
        if labels is not None:
            loss, n_loss_tokens = self._supervised_loss(hidden, labels, position_ids if packed else None)
        else:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden[:, keep])  # (B, T', V)

        return EveCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            n_loss_tokens=n_loss_tokens,
            image_hidden_states=collector.result() if collector is not None else None,
        )

    def _supervised_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean CE over shifted labels != -100, with the LM head only at those rows; and their count."""
        targets = labels[:, 1:]  # (B, T-1): token t predicts label t+1
        supervised = supervised_targets(labels, position_ids)
        rows = hidden[:, :-1][supervised]  # (n, D)
        n_loss_tokens = supervised.sum()
        logits = self.lm_head(rows).float()  # (n, V); fp32 for a stable log-softmax
        if rows.shape[0] == 0:
            return logits.sum() * 0.0, n_loss_tokens  # keeps the graph (and every rank's collectives) alive
        return F.cross_entropy(logits, targets[supervised]), n_loss_tokens

    # ----------------------------------------------------------------------------------------------
    # Generation
    def prepare_inputs_for_generation(self, *args, **kwargs) -> dict:
        """HF generation inputs; pixels (and their grids) only on the prefill step."""
        model_inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        if model_inputs.get("pixel_values") is None:
            model_inputs.pop("pixel_values", None)
            model_inputs.pop("image_grid_hw", None)
        return model_inputs

    # ----------------------------------------------------------------------------------------------
    # Loading and building
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' from_pretrained; an encoder front-end's encoders come back frozen, as built."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        if isinstance(model.vision_tower, EncoderFrontend):
            model.vision_tower.freeze_encoders()
        return loaded

    @classmethod
    def from_llm(
        cls,
        path_or_model: str | Path | PreTrainedModel,
        gguf_file: str | None = None,
        dtype: torch.dtype | str | None = None,
        **eve_overrides,
    ) -> EveForCausalLM:
        """EVE from a plain Llama/Vicuna or Qwen2 checkpoint dir (or a Llama GGUF): LLM weights copied (and
        into the visual layer copies when `modality_split` is set), vision front-end initialised (the PEL and
        projector, EVEv2's patch embedding, or the encoders from their weights and the connector)."""
        llm = load_llm(path_or_model, gguf_file, dtype)
        config = EveConfig(**{**text_fields(llm.config), **eve_overrides})
        config._attn_implementation = eve_overrides.get(
            "attn_implementation", llm.config._attn_implementation
        )
        with init.no_init_weights():  # the LLM part is overwritten below; only the front-end needs an init
            model = cls(config)
        missing, unexpected = model.model.load_state_dict(llm.model.state_dict(), strict=False)
        if unexpected or any(".visual." not in key for key in missing):
            raise ValueError(
                f"{path_or_model!r} does not fit {config.backbone}: missing {missing}, unexpected {unexpected}."
            )
        for layer in model.model.layers:
            if isinstance(layer, ModalityDecoderLayer):
                layer.init_visual_from_text()
        model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
        model.vision_tower.apply(model._init_weights)
        model.tie_weights()
        model.to(dtype=llm.dtype)
        logger.info(
            "Built EVE from %s: LLM %.1fM params copied, vision front-end (%s) %.2fM params initialised.",
            getattr(llm.config, "_name_or_path", "an in-memory LLM"),
            sum(p.numel() for p in model.model.parameters()) / 1e6,
            config.vision_frontend,
            sum(p.numel() for p in model.vision_tower.parameters()) / 1e6,
        )
        return model


AutoModelForCausalLM.register(EveConfig, EveForCausalLM)
