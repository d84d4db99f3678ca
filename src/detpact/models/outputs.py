"""What detectors return: one output type per head family, the same in train and eval mode.

Both carry `cls_logits` [B, N, C] and `boxes` [B, N, 4] (float32 xyxy, input-image
pixels) for N candidates per image (locations of the dense head, queries of the
rtdetr head): evaluation, export and parity read only those two. `Detector.nms_free`
says how to decode them: NMS for the dense head, a plain top-k for the rtdetr head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class DetectorOutput:
    """The dense head's output (models/heads/dense.py).

    cls_logits: [B, A, C] raw class logits for the A locations of all levels.
    boxes:      [B, A, 4] float32 xyxy boxes in input-image pixels.
    points:     [A, 2] float32 (x, y) location centres in input-image pixels.
    strides:    [A] float32 stride of each location's level.
    box_logits: [B, A, 4, reg_max] float32 logits of the side distributions (l, t, r, b),
                or None for the reg_max = 1 head.
    """

    cls_logits: Tensor
    boxes: Tensor
    points: Tensor
    strides: Tensor
    box_logits: Tensor | None = None


@dataclass
class QueryPrediction:
    """One set of query predictions: logits [B, Q, C] and boxes [B, Q, 4] float32 cxcywh,
    normalised by the input width and height (in [0, 1])."""

    logits: Tensor
    boxes: Tensor


@dataclass
class DenoisingGroups:
    """How the denoising queries of a batch map to its ground truth.

    num_queries:  D, the denoising queries placed before the Q matching queries.
    num_groups:   groups of noised copies; each holds 2 * max_gt queries (a positive
                  and a negative copy of every box, padded to the largest image).
    positive_idx: B tensors, [P_i] int64 the denoising query index of each positive
                  copy of image i, in group order.
    target_idx:   B tensors, [P_i] int64 the ground-truth index (into image i's
                  targets) each of those positives reconstructs.
    """

    num_queries: int
    num_groups: int
    positive_idx: list[Tensor]
    target_idx: list[Tensor]


@dataclass
class DetrOutput:
    """The rtdetr head's output (models/heads/rtdetr.py).

    cls_logits:  [B, Q, C] class logits of the last decoder layer (sigmoid = score).
    boxes:       [B, Q, 4] float32 xyxy boxes of the last layer in input-image pixels.
    image_size:  (H, W) of the input images: normalised boxes times (W, H, W, H) are pixels.
    layers:      every decoder layer's QueryPrediction, last layer last (the
                 auxiliary losses use all of them); [layers[-1]] alone when
                 aux_loss is off or in eval mode.
    encoder:     the encoder's top-Q proposals that seeded the decoder (training only).
    denoising:   per decoder layer, the predictions of the denoising queries
                 (training with denoising only), and `dn_groups` their map to targets.
    """

    cls_logits: Tensor
    boxes: Tensor
    image_size: tuple[int, int]
    layers: list[QueryPrediction] = field(default_factory=list)
    encoder: QueryPrediction | None = None
    denoising: list[QueryPrediction] | None = None
    dn_groups: DenoisingGroups | None = None
