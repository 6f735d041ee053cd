"""Patch Aligning Layer (PAL): distils the LLM's image positions against frozen teacher features.

The official EVE `VisionCompressor`, batched (docs/architecture.md). One head per aligning level:
a teacher's one layer, or each of its `levels` (e.g. a shallow and a deep layer, each with its own
head and loss weight; the levels of a teacher share its grid, so their pooling is done once). Each
head reads the LLM hidden states at layers L, L-step, ..., 0 (HF `hidden_states` indices), at image
patch positions only (the model gathers them by hooks: `image_hidden_states`, each (N, D) with
N = sum(h_i * w_i)), and:
1. average-pools every image's student grid (h, w) onto the teacher's *valid* grid (vh, vw), the
   patch-aligned box where the centred image lies on the teacher's canvas (EVE: the same grid;
   HD: an exact factor 2; in general adaptive pooling, see `pooling_plan`);
2. per selected layer LayerNorm(D) + Linear(D, Ct, no bias);
3. cross-layer attention, 8 heads, per token: query = projection of layer L, keys = values =
   the projections of the other selected layers, logits scaled by Ct^-0.5 (the official scale,
   `attn_scale="official"`; "head_dim" = SDPA's (Ct/heads)^-0.5 is sqrt(heads) times sharper);
4. prediction = Linear(D, Ct)(h_L) + Linear(Ct, Ct)(attn), both with a bias;
5. loss per image = 1 - mean cosine(prediction, teacher feature) over the valid teacher patches,
   averaged over the images that have a valid patch (dummy images have none).

Pooling happens before the projections: the head is per token, so pooling first costs 4x less
in HD and compares like with like (one prediction per teacher patch), as the official code does.
The total PAL loss is the sum over levels of weight x level loss.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

ALIGNER_WEIGHTS = "aligner.safetensors"
ALIGNER_CONFIG = "aligner_config.json"
ATTN_SCALES = ("official", "head_dim")


def layers_for(num_hidden_layers: int, step: int = 4) -> list[int]:
    """HF hidden-state indices L, L-step, ..., down to 0 when step divides L (EVE-7B: 32, 28, ..., 0)."""
    if step <= 0:
        raise ValueError(f"aligning layer step must be positive, got {step}")
    return list(range(num_hidden_layers, -1, -step))


@dataclass
class AlignerConfig:
    """Shape of the aligning heads (one head per aligning level); saved beside the export."""

    hidden_size: int
    """D, the LLM width."""
    teacher_widths: list[int]
    """Ct of each head: one per aligning level (a teacher's layer), in teacher order."""
    layers: list[int]
    """HF hidden-state indices read by the PAL, the first one is L (the query layer)."""
    num_heads: int = 8
    """Heads of the cross-layer attention (Ct must divide by it)."""
    attn_scale: str = "official"
    """Logit scale of the cross-layer attention: "official" = Ct^-0.5, "head_dim" = (Ct/heads)^-0.5."""
    loss_weights: list[float] = field(default_factory=lambda: [1.0])
    """Weight of each head's loss in the total loss (EVE: 1.0)."""
    names: list[str] | None = None
    """Aligning level of each head (`TeacherSet.names`, "timm:efficientnet_lite0@-3"), so that a next
    stage continues heads only onto the same levels; None in exports written before heads had names."""

    def __post_init__(self) -> None:
        if len(self.loss_weights) == 1 and len(self.teacher_widths) > 1:
            self.loss_weights = self.loss_weights * len(self.teacher_widths)
        if len(self.loss_weights) != len(self.teacher_widths):
            raise ValueError(
                f"AlignerConfig: {len(self.loss_weights)} loss weights for {len(self.teacher_widths)} "
                "heads; give one weight per head"
            )
        if self.names is not None and len(self.names) != len(self.teacher_widths):
            raise ValueError(f"AlignerConfig: names {self.names} for {len(self.teacher_widths)} heads")
        if not self.layers:
            raise ValueError("AlignerConfig.layers is empty; use layers_for(num_hidden_layers, step)")
        if self.attn_scale not in ATTN_SCALES:
            raise ValueError(f"AlignerConfig.attn_scale {self.attn_scale!r}: choose one of {ATTN_SCALES}")


class PatchAligningHead(nn.Module):
    """One teacher's PAL: per-layer LayerNorm + Linear, cross-layer attention, prediction head."""

    def __init__(
        self,
        hidden_size: int,
        teacher_width: int,
        num_layers: int,
        num_heads: int = 8,
        attn_scale: str = "official",
    ) -> None:
        super().__init__()
        if teacher_width % num_heads:
            raise ValueError(f"teacher width {teacher_width} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        # The official logits are (q . k) * Ct^-0.5 per head, not SDPA's (q . k) * head_dim^-0.5.
        head_dim = teacher_width // num_heads
        self.scale = (teacher_width if attn_scale == "official" else head_dim) ** -0.5
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_layers))
        self.projs = nn.ModuleList(
            nn.Linear(hidden_size, teacher_width, bias=False) for _ in range(num_layers)
        )
        self.skip = nn.Linear(hidden_size, teacher_width)  # Linear(D, Ct)(h_L), with a bias as EVE's
        self.out = nn.Linear(teacher_width, teacher_width)  # Linear(Ct, Ct)(attn)
        self.init_weights()

    def init_weights(self) -> None:
        """Default LayerNorm, Linear weights N(0, 0.02), zero biases."""
        for norm in self.norms:
            norm.reset_parameters()
        for lin in [*self.projs, self.skip, self.out]:
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Predict teacher features (M, Ct) from hidden states [h_L, ...], each (M, D)."""
        z = torch.stack([proj(norm(h)) for h, norm, proj in zip(hidden, self.norms, self.projs)], 1)
        m, n_layers, ct = z.shape  # (M, n, Ct)
        if n_layers == 1:
            attn = torch.zeros_like(z[:, 0])  # no other layer to attend to
        else:
            hd = ct // self.num_heads
            q = z[:, :1].view(m, 1, self.num_heads, hd).transpose(1, 2)  # (M, H, 1, hd)
            kv = z[:, 1:].view(m, n_layers - 1, self.num_heads, hd).transpose(1, 2)  # (M, H, n-1, hd)
            attn = F.scaled_dot_product_attention(q, kv, kv, scale=self.scale)  # over layers: (M, H, 1, hd)
            attn = attn.transpose(1, 2).reshape(m, ct)
        return self.skip(hidden[0]) + self.out(attn)  # (M, Ct)


@dataclass
class PoolingPlan:
    """Sparse average-pooling of all student patches onto all valid teacher patches of a batch."""

    src: torch.Tensor
    """(E,) index into the concatenated student patches (N, D)."""
    dst: torch.Tensor
    """(E,) index into the pooled rows (M,)."""
    weight: torch.Tensor
    """(E,) 1 / (size of the pooling bin)."""
    image: torch.Tensor
    """(M,) image index of each pooled row."""
    teacher_index: torch.Tensor
    """(M,) flat index into the teacher features (n * th * tw) of each pooled row."""
    num_rows: int
    """M, the number of valid teacher patches in the batch."""


def _bins(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-pooling bin [start, end) of each output cell, the same formula as torch."""
    i = np.arange(n_out)
    return (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)


def _bin_members(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices of each output bin, padded to the largest bin: (n_out, k) and its mask."""
    start, end = _bins(n_in, n_out)
    k = int((end - start).max())
    members = start[:, None] + np.arange(k)[None, :]
    mask = members < end[:, None]
    return np.minimum(members, n_in - 1), mask


def pooling_plan(
    student_hw: torch.Tensor, valid_boxes: torch.Tensor, teacher_hw: tuple[int, int]
) -> PoolingPlan:
    """Plan the pooling of student grids (n, 2) onto the valid teacher boxes (n, 4) of a teacher grid.

    valid_boxes: (top, left, vh, vw) in teacher patches (`valid_boxes`); the pooled row of box cell
    (a, b) compares with teacher patch (top + a, left + b).

    Adaptive average pooling (torch's bins: start = floor(i*n/m), end = ceil((i+1)*n/m)). When
    the student grid is an exact multiple of the valid grid (EVE-HD: 48 -> 24) the bins tile it
    and this is plain avg_pool(k); otherwise (rounding of the short side differs between the
    student's 28-px and the teacher's 14-px grids by up to one cell) bins overlap by one cell or,
    if the student grid is the smaller one, a cell is repeated. Built on the CPU from the
    integer grids only, then applied with one `index_add_` for the whole batch (no per-image ops).
    """
    th, tw = teacher_hw
    src, dst, wts, img, tidx = [], [], [], [], []
    offset, row = 0, 0
    for i, ((h, w), (top, left, vh, vw)) in enumerate(zip(student_hw.tolist(), valid_boxes.tolist())):
        if vh > 0 and vw > 0 and h > 0 and w > 0:
            rows, rmask = _bin_members(h, vh)  # (vh, kh)
            cols, cmask = _bin_members(w, vw)  # (vw, kw)
            idx = offset + rows[:, None, :, None] * w + cols[None, :, None, :]  # (vh, vw, kh, kw)
            mask = rmask[:, None, :, None] & cmask[None, :, None, :]
            size = mask.sum((2, 3))  # (vh, vw) bin sizes
            out_row = row + np.arange(vh * vw).reshape(vh, vw)
            src.append(idx[mask])
            dst.append(np.broadcast_to(out_row[:, :, None, None], mask.shape)[mask])
            wts.append(np.broadcast_to((1.0 / size)[:, :, None, None], mask.shape)[mask])
            img.append(np.full(vh * vw, i))
            a, b = np.meshgrid(np.arange(vh), np.arange(vw), indexing="ij")
            tidx.append((i * th * tw + (top + a) * tw + (left + b)).ravel())
            row += vh * vw
        offset += h * w

    def cat(parts: list, dtype: torch.dtype) -> torch.Tensor:
        if not parts:
            return torch.zeros(0, dtype=dtype)
        return torch.from_numpy(np.concatenate(parts)).to(dtype)

    return PoolingPlan(
        src=cat(src, torch.long),
        dst=cat(dst, torch.long),
        weight=cat(wts, torch.float32),
        image=cat(img, torch.long),
        teacher_index=cat(tidx, torch.long),
        num_rows=row,
    )


def apply_pooling(x: torch.Tensor, plan: PoolingPlan) -> torch.Tensor:
    """Pool student patches x (N, D) into (M, D) following the plan."""
    src, dst, w = plan.src.to(x.device), plan.dst.to(x.device), plan.weight.to(x.device, x.dtype)
    out = x.new_zeros(plan.num_rows, x.shape[-1])
    return out.index_add_(0, dst, x[src] * w[:, None])


def valid_boxes(valid: torch.Tensor) -> torch.Tensor:
    """(top, left, vh, vw) in patches of each image's valid box from a box-shaped mask (n, th, tw) -> (n, 4)."""
    rows, cols = valid.any(2), valid.any(1)  # (n, th), (n, tw)
    top = rows.int().argmax(1) * rows.any(1)  # first valid row (0 when none)
    left = cols.int().argmax(1) * cols.any(1)
    return torch.stack([top, left, rows.sum(1), cols.sum(1)], 1)


def cosine_alignment_loss(
    pred: torch.Tensor, target: torch.Tensor, image: torch.Tensor, num_images: int
) -> torch.Tensor:
    """Mean over images with patches of (1 - mean cosine over the image's patches); (M, C) inputs."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-6)  # (M,)
    per_image_sum = cos.new_zeros(num_images).index_add_(0, image, cos)
    count = torch.bincount(image, minlength=num_images).to(cos.dtype)
    has = count > 0
    if not bool(has.any()):
        return pred.sum() * 0.0  # keeps the graph (and ZeRO-3 gathers) identical on every rank
    per_image = 1.0 - per_image_sum[has] / count[has]
    return per_image.mean()


class PatchAligner(nn.Module):
    """All aligning heads (one per aligning level) and the combined, weighted PAL loss."""

    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(
            PatchAligningHead(config.hidden_size, ct, len(config.layers), config.num_heads, config.attn_scale)
            for ct in config.teacher_widths
        )

    @property
    def layers(self) -> list[int]:
        """HF hidden-state indices to request from the model (`image_hidden_layers`)."""
        return list(self.config.layers)

    def forward(
        self,
        image_hidden_states: tuple[torch.Tensor, ...] | list[torch.Tensor],
        image_grid_hw: torch.Tensor,
        teacher_outputs: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Weighted total PAL loss and the per-level losses.

        image_hidden_states: per layer of `self.layers`, (N, D) patch tokens of all images;
        image_grid_hw: (n, 2) student grids; teacher_outputs: per aligning level (features
        (n, th, tw, Ct), valid (n, th, tw)), one row per image in the same order.
        """
        if len(teacher_outputs) != len(self.heads):
            raise ValueError(
                f"PAL has {len(self.heads)} heads but got {len(teacher_outputs)} teacher outputs"
            )
        n = image_grid_hw.shape[0]
        losses = []
        last_valid, last_grid = None, None  # of the previous level, whose plan and pooled rows are kept
        for head, (feats, valid) in zip(self.heads, teacher_outputs):
            if feats.shape[0] != n:
                raise ValueError(
                    f"teacher gave features for {feats.shape[0]} images but the batch has {n} "
                    "(image_grid_hw); teacher_pixel_values must have one row per image"
                )
            th, tw = feats.shape[1:3]
            # The levels of one teacher share its valid mask (one tensor) and grid: pool them once.
            if valid is not last_valid or (th, tw) != last_grid:
                plan = pooling_plan(image_grid_hw.cpu(), valid_boxes(valid).cpu(), (th, tw))
                pooled = [apply_pooling(h, plan) for h in image_hidden_states]  # each (M, D)
                last_valid, last_grid = valid, (th, tw)
            pred = head(pooled)  # (M, Ct)
            target = feats.reshape(-1, feats.shape[-1])[plan.teacher_index.to(feats.device)]
            losses.append(cosine_alignment_loss(pred, target, plan.image.to(pred.device), n))
        total = sum(w * loss for w, loss in zip(self.config.loss_weights, losses))
        return total, losses

    def save(self, directory: str | Path) -> None:
        """Write aligner.safetensors + aligner_config.json into directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / ALIGNER_WEIGHTS))
        (directory / ALIGNER_CONFIG).write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> PatchAligner:
        """Rebuild a PatchAligner saved by `save` (strict key match)."""
        directory = Path(directory)
        cfg_path = directory / ALIGNER_CONFIG
        if not cfg_path.exists():
            raise FileNotFoundError(
                f"{cfg_path} not found: the previous stage's export has no aligning layer; "
                "start the PAL fresh (omit the load) or point at the stage's export/ directory"
            )
        aligner = cls(AlignerConfig(**json.loads(cfg_path.read_text())))
        state = load_file(str(directory / ALIGNER_WEIGHTS))
        missing, unexpected = (
            sorted(set(aligner.state_dict()) - set(state)),
            sorted(set(state) - set(aligner.state_dict())),
        )
        if missing or unexpected:
            raise ValueError(
                f"{directory / ALIGNER_WEIGHTS} does not fit this aligning layer (missing {missing[:4]}, "
                f"unexpected {unexpected[:4]}): it was saved by an older version; delete it and its "
                f"{ALIGNER_CONFIG} to start the aligning layer fresh"
            )
        aligner.load_state_dict(state, strict=True)
        return aligner
