"""Contrastive denoising queries (DN-DETR / DINO, as RT-DETR builds them).

In training, noised copies of the ground truth join the decoder as extra queries, each
already assigned to its box: learning to undo the noise trains the decoder's box
refinement without waiting for the Hungarian matching to settle. Every group holds a
positive copy of each box (corners moved by less than half its size: reconstruct it)
and a negative one (moved by between one half and one size: predict "no object"),
padded to the image with the most boxes.

The noise comes from torch's global generator of the features' device, which the
training loop seeds and checkpoints: a resumed run draws the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detpact.models.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid
from detpact.models.outputs import DenoisingGroups


@dataclass
class DenoisingQueries:
    """The denoising part of the decoder input for a batch of B images.

    content:    [B, D, d] label embeddings of the (noised) classes.
    ref_logits: [B, D, 4] inverse-sigmoid of the noised cxcywh boxes, normalised.
    attn_mask:  [D + Q, D + Q] bool, True where query i may NOT attend to query j
                (nn.MultiheadAttention's convention), for the D denoising queries
                followed by the Q matching queries.
    groups:     which denoising queries reconstruct which ground truth.
    """

    content: Tensor
    ref_logits: Tensor
    attn_mask: Tensor
    groups: DenoisingGroups


def build_denoising_queries(targets: list[dict[str, Tensor]], image_size: tuple[int, int], label_embed: nn.Embedding,
                            num_queries: int, num_denoising: int, label_noise_ratio: float, box_noise_scale: float,
                            device: torch.device) -> DenoisingQueries | None:
    """Noised copies of `targets` as max(1, num_denoising // max_gt) groups of 2 * max_gt queries.

    Args:
        targets: B dicts, "boxes" [N_i, 4] xyxy input pixels and "labels" [N_i] int64.
        image_size: (H, W) of the input, to normalise the boxes.
        label_embed: Embedding(num_classes + 1, d); the last row (padding) feeds the
            slots of images with fewer than max_gt boxes.
        num_queries: Q, the matching queries the mask must also cover.
        num_denoising: the budget of denoising queries per group set.
        label_noise_ratio: each label is replaced by a random class with probability
            label_noise_ratio / 2 (the random class may be the true one).
        box_noise_scale: corners move by up to this many half-sides of the box.
        device: where the queries (and the index tensors of `groups`) are placed.

    Returns:
        None when there is nothing to denoise (no boxes in the batch, or num_denoising 0).
    """
    counts = [len(t["labels"]) for t in targets]
    max_gt = max(counts, default=0)
    if num_denoising <= 0 or max_gt == 0:
        return None
    num_classes = label_embed.num_embeddings - 1
    num_groups = max(1, num_denoising // max_gt)
    batch = len(targets)
    h, w = image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=device)

    labels = torch.full((batch, max_gt), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros((batch, max_gt, 4), dtype=torch.float32, device=device)  # cxcywh in [0, 1]
    real = torch.zeros((batch, max_gt), dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        if n:
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = box_xyxy_to_cxcywh(t["boxes"].to(device=device, dtype=torch.float32) / scale)
            real[i, :n] = True

    # Slot s of the D = 2 * max_gt * groups queries copies box s % max_gt; the second
    # half of each group (s // max_gt odd) are the negatives.
    per_group = 2 * max_gt
    total = per_group * num_groups
    labels = labels.repeat(1, 2 * num_groups)  # [B, D]
    boxes = boxes.repeat(1, 2 * num_groups, 1)  # [B, D, 4]
    real = real.repeat(1, 2 * num_groups)  # [B, D]
    negative = (torch.arange(total, device=device) // max_gt) % 2 == 1  # [D]

    if label_noise_ratio > 0:
        flip = torch.rand((batch, total), device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, (batch, total), device=device)
        labels = torch.where(flip & real, random_labels, labels)
    if box_noise_scale > 0:
        half_sides = boxes[..., 2:].repeat(1, 1, 2) * 0.5 * box_noise_scale  # [B, D, 4] (w, h, w, h) / 2
        sign = torch.randint(0, 2, (batch, total, 4), device=device) * 2.0 - 1.0
        # Positives move by [0, 1) half-sides, negatives by [1, 2): far enough to be wrong.
        magnitude = torch.rand((batch, total, 4), device=device) + negative[None, :, None].float()
        corners = (box_cxcywh_to_xyxy(boxes) + sign * magnitude * half_sides).clamp(0.0, 1.0)
        boxes = box_xyxy_to_cxcywh(corners)

    return DenoisingQueries(
        content=label_embed(labels),
        ref_logits=inverse_sigmoid(boxes),
        attn_mask=denoising_attention_mask(total, per_group, num_queries, device),
        groups=_groups(counts, max_gt, num_groups, total, device),
    )


def denoising_attention_mask(num_dn: int, per_group: int, num_queries: int, device: torch.device) -> Tensor:
    """[D + Q, D + Q] bool, True = blocked: the matching queries must not see the denoising
    ones (which carry the answers), and each denoising group sees only itself."""
    mask = torch.zeros((num_dn + num_queries, num_dn + num_queries), dtype=torch.bool, device=device)
    mask[num_dn:, :num_dn] = True
    group = torch.arange(num_dn, device=device) // per_group  # [D]
    mask[:num_dn, :num_dn] = group[:, None] != group[None, :]
    return mask


def _groups(counts: list[int], max_gt: int, num_groups: int, total: int, device: torch.device) -> DenoisingGroups:
    """The positive query of box j of an image in group g is g * 2 * max_gt + j."""
    starts = torch.arange(num_groups, device=device)[:, None] * (2 * max_gt)  # [G, 1]
    positive_idx, target_idx = [], []
    for n in counts:
        gt = torch.arange(n, device=device)[None, :]  # [1, n]
        positive_idx.append((starts + gt).flatten())  # [G * n], group-major
        target_idx.append(gt.expand(num_groups, n).flatten())
    return DenoisingGroups(num_queries=total, num_groups=num_groups, positive_idx=positive_idx, target_idx=target_idx)
