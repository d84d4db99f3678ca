"""`model:` backbone, neck, head (assigner and loss) and postprocessing."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from detpact.config.section import Section


class CSPDarknetArgs(Section):
    width_mult: float = Field(0.25, gt=0.0)
    depth_mult: float = Field(0.33, gt=0.0)
    # The CSP block of each stage: c2f (YOLOv8) or c3k2 (YOLO11: thinner bottlenecks in
    # the shallow stages, C3k blocks in the deep ones).
    block: Literal["c2f", "c3k2"] = "c2f"
    # YOLO11's C2PSA (position-sensitive self-attention) after SPPF, on P5.
    attention: bool = False


class BackboneConfig(Section):
    name: Literal["cspdarknet"] = "cspdarknet"
    args: CSPDarknetArgs = CSPDarknetArgs()


class NeckConfig(Section):
    name: Literal["pan"] = "pan"
    # The CSP block of each fusion: c2f (YOLOv8) or c3k2 (YOLO11).
    block: Literal["c2f", "c3k2"] = "c2f"


class AssignerConfig(Section):
    """Which locations learn which ground-truth box (models/matching.py)."""

    # center_sampling: FCOS-style, fixed by geometry; task_aligned: YOLOv8/11's TAL, the
    # locations the model itself already scores and places best.
    name: Literal["center_sampling", "task_aligned"] = "task_aligned"
    # center_sampling: a location is positive for a box when it lies within
    # `center_radius * stride` of the box centre (and inside the box), and the box's
    # size suits the level (max regression distance within that level's range).
    center_radius: float = Field(1.5, gt=0.0)
    # Upper bound of each level's range of max(l, t, r, b), in units of the level's
    # stride; the last level is unbounded. [8, 8] means P3: (0, 64], P4: (64, 128].
    range_strides: list[float] = [8.0, 8.0]
    # task_aligned: each box takes the `topk` locations inside it with the largest
    # score^alpha * CIoU^beta (score of the box's class, CIoU of the predicted box).
    topk: int = Field(10, ge=1)
    alpha: float = Field(0.5, ge=0.0)
    beta: float = Field(6.0, ge=0.0)
    # YOLO26's small-target rule (STAL): a box side shorter than this many pixels counts
    # as this long when choosing the locations "inside" it, so that a box smaller than
    # the grid still gets candidates. None = off.
    small_box_side: float | None = Field(None, gt=0.0)


class LossConfig(Section):
    # The weights of YOLOv8/11 (cls 0.5, box 7.5, dfl 1.5); the losses are normalised as theirs.
    cls_weight: float = Field(0.5, ge=0.0)
    box_weight: float = Field(7.5, ge=0.0)
    # Distribution focal loss on the box bins; only with model.head.reg_max > 1.
    dfl_weight: float = Field(1.5, ge=0.0)
    # The IoU the box loss maximises: generalized (GIoU) or complete (CIoU: also the
    # centre distance and the aspect ratio).
    iou: Literal["giou", "ciou"] = "ciou"
    # Focal modulation of the classification loss: |p - target|^gamma (0 = plain BCE; the
    # centre-sampling recipe used 2).
    quality_gamma: float = Field(0.0, ge=0.0)


class HeadConfig(Section):
    name: Literal["dense"] = "dense"
    # Box regression: 1 = each side is one number (exp of a logit times the stride);
    # > 1 = each side is a distribution over reg_max bins of one stride (DFL, as in
    # YOLOv8/11, whose reg_max is 16), read out as its expectation.
    reg_max: int = Field(16, ge=1, le=64)
    # The two 3x3 convs of the classification branch: full convs, or depthwise + 1x1
    # (YOLO11's cheaper classification branch).
    cls_conv: Literal["full", "depthwise"] = "full"
    assigner: AssignerConfig = AssignerConfig()
    loss: LossConfig = LossConfig()


class PostprocessConfig(Section):
    score_threshold: float = Field(0.001, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.6, gt=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    pre_nms_topk: int = Field(1000, ge=1)


class ModelConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    head: HeadConfig = HeadConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
