"""`model:` backbone, neck, head (assigner and loss) and postprocessing."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from detpact.config.section import Section


class TinyCNNArgs(Section):
    # Channels of the stem; each of the four stride-2 stages after it doubles them
    # (16 gives P3/P4/P5 of 64/128/256 channels).
    width: int = Field(16, ge=4)


# CSP-Darknet size presets (YOLOv8/11's n/s/m/l/x): width_mult, depth_mult.
CSPDARKNET_SIZES = {"n": (0.25, 0.33), "s": (0.5, 0.33), "m": (0.75, 0.67), "l": (1.0, 1.0), "x": (1.25, 1.33)}


class CSPDarknetArgs(Section):
    # A size preset fills width_mult and depth_mult unless they are given explicitly.
    size: Literal["n", "s", "m", "l", "x"] | None = None
    width_mult: float = Field(0.25, gt=0.0)
    depth_mult: float = Field(0.33, gt=0.0)
    # The CSP block of each stage: c2f (YOLOv8) or c3k2 (YOLO11: thinner bottlenecks in
    # the shallow stages, C3k blocks in the deep ones).
    block: Literal["c2f", "c3k2"] = "c2f"
    # YOLO11's C2PSA (position-sensitive self-attention) after SPPF, on P5.
    attention: bool = False

    @model_validator(mode="after")
    def _apply_size(self) -> CSPDarknetArgs:
        if self.size is not None:
            width, depth = CSPDARKNET_SIZES[self.size]
            if "width_mult" not in self.model_fields_set:
                self.width_mult = width
            if "depth_mult" not in self.model_fields_set:
                self.depth_mult = depth
        return self


class TorchvisionArgs(Section):
    """resnet18/34/50 and convnext_tiny: torchvision's layout, so its weight files load."""

    # convnext_tiny only: stochastic depth, the drop rate of the last block (torchvision
    # trains ImageNet with 0.1; fine-tuning on small sets does well with 0).
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)


class CSPResNetArgs(Section):
    # PP-YOLOE's s/m/l/x are width 0.50/0.75/1.00/1.25 with depth 0.33/0.67/1.00/1.33.
    width_mult: float = Field(0.5, gt=0.0)
    depth_mult: float = Field(0.33, gt=0.0)


# Each backbone family's `args` schema; the keys are the valid `model.backbone.name`s.
BACKBONE_ARGS: dict[str, type[Section]] = {
    "tiny_cnn": TinyCNNArgs,
    "cspdarknet": CSPDarknetArgs,
    "resnet18": TorchvisionArgs,
    "resnet34": TorchvisionArgs,
    "resnet50": TorchvisionArgs,
    "convnext_tiny": TorchvisionArgs,
    "cspresnet": CSPResNetArgs,
}
# Names the seeds' configs use: `cspdarknet_s` is cspdarknet with args.size s.
BACKBONE_ALIASES = {f"cspdarknet_{size}": ("cspdarknet", {"size": size}) for size in CSPDARKNET_SIZES}


class BackboneConfig(Section):
    name: str = "cspdarknet"
    # The normalisation of the backbone's batch-norm layers: bn (trained), gn (GroupNorm,
    # 32 groups, for tiny batches) or frozen_bn (fixed statistics and affine, as when
    # fine-tuning a pretrained backbone). ConvNeXt keeps its LayerNorm: bn only.
    norm: Literal["bn", "gn", "frozen_bn"] = "bn"
    # Family arguments, checked against the family's schema and filled with its defaults.
    args: dict[str, Any] = {}
    # Backbone-only pretrained weights: a torchvision-style .pth/.pt state dict or a
    # .safetensors file; prefixes such as `backbone.` or `module.` are stripped.
    weights: str | None = None

    @model_validator(mode="after")
    def _resolve_args(self) -> BackboneConfig:
        if self.name in BACKBONE_ALIASES:
            self.name, preset = BACKBONE_ALIASES[self.name]
            self.args = {**preset, **self.args}
        if self.name not in BACKBONE_ARGS:
            raise ValueError(f"unknown backbone {self.name!r}; choices: {', '.join(BACKBONE_ARGS)} "
                             f"(aliases: {', '.join(BACKBONE_ALIASES)})")
        schema = BACKBONE_ARGS[self.name]
        try:
            self.args = schema.model_validate(self.args).model_dump(mode="json")
        except ValidationError as exc:
            raise ValueError("; ".join(_describe_arg_error(e, self.name, schema) for e in exc.errors())) from None
        if self.name == "convnext_tiny" and self.norm != "bn":
            raise ValueError("convnext_tiny normalises with LayerNorm: leave model.backbone.norm at bn")
        return self


class NeckConfig(Section):
    # pan: YOLO's path aggregation; none: the backbone's maps go straight on (the rtdetr
    # head fuses scales in its own hybrid encoder).
    name: Literal["pan", "none"] = "pan"
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


class ProjectorConfig(Section):
    # A 1x1 conv + norm per level to d_model channels, between neck and head. Required by
    # the rtdetr head (its transformer width; 256 when unset); optional for the dense head.
    d_model: int | None = Field(None, ge=8)


class MatcherConfig(Section):
    """Hungarian matching of queries to boxes: the cost of a pair is the weighted sum of a
    focal class cost, the L1 distance of normalised cxcywh boxes and -GIoU (RT-DETR's 2/5/2)."""

    cost_class: float = Field(2.0, ge=0.0)
    cost_bbox: float = Field(5.0, ge=0.0)
    cost_giou: float = Field(2.0, ge=0.0)
    alpha: float = Field(0.25, ge=0.0, le=1.0)
    gamma: float = Field(2.0, ge=0.0)


class SetLossConfig(Section):
    """The rtdetr losses, per decoder layer, the encoder proposals and the denoising groups:
    varifocal classification towards the IoU of the matched box, L1 and GIoU."""

    vfl_weight: float = Field(1.0, ge=0.0)
    l1_weight: float = Field(5.0, ge=0.0)
    giou_weight: float = Field(2.0, ge=0.0)
    alpha: float = Field(0.75, ge=0.0, le=1.0)
    gamma: float = Field(2.0, ge=0.0)


class RTDETRConfig(Section):
    """The RT-DETR-style head (models/heads/rtdetr.py): hybrid encoder, query selection,
    deformable decoder. Its width is model.projector.d_model."""

    num_queries: int = Field(300, ge=1)
    num_decoder_layers: int = Field(6, ge=1)
    num_heads: int = Field(8, ge=1)
    # Sampling points per head and level of the deformable cross-attention.
    num_points: int = Field(4, ge=1)
    dim_feedforward: int = Field(1024, ge=8)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # Hybrid encoder: AIFI transformer layers on P5, then the CNN fusion whose CSP blocks
    # hold round(3 * depth_mult) RepVGG blocks with expansion x d_model hidden channels.
    encoder_layers: int = Field(1, ge=0)
    encoder_ffn: int = Field(1024, ge=8)
    depth_mult: float = Field(1.0, gt=0.0)
    expansion: float = Field(1.0, gt=0.0)
    # Denoising training (DN-DETR / DINO): noised copies of the ground truth as extra
    # queries, learned to be reconstructed; up to num_denoising queries per batch.
    denoising: bool = True
    num_denoising: int = Field(100, ge=0)
    label_noise_ratio: float = Field(0.5, ge=0.0, le=1.0)
    box_noise_scale: float = Field(1.0, ge=0.0)
    # Losses on every decoder layer, not only the last. (The encoder's proposals always
    # have their loss: it trains the class scores that select the queries.)
    aux_loss: bool = True
    matcher: MatcherConfig = MatcherConfig()
    loss: SetLossConfig = SetLossConfig()


class HeadConfig(Section):
    # dense: anchor-free per-location head with NMS; rtdetr: set prediction, NMS-free.
    name: Literal["dense", "rtdetr"] = "dense"
    # Box regression: 1 = each side is one number (exp of a logit times the stride);
    # > 1 = each side is a distribution over reg_max bins of one stride (DFL, as in
    # YOLOv8/11, whose reg_max is 16), read out as its expectation.
    reg_max: int = Field(16, ge=1, le=64)
    # The two 3x3 convs of the classification branch: full convs, or depthwise + 1x1
    # (YOLO11's cheaper classification branch).
    cls_conv: Literal["full", "depthwise"] = "full"
    assigner: AssignerConfig = AssignerConfig()
    loss: LossConfig = LossConfig()
    rtdetr: RTDETRConfig = RTDETRConfig()


class PostprocessConfig(Section):
    score_threshold: float = Field(0.001, ge=0.0, le=1.0)
    iou_threshold: float = Field(0.6, gt=0.0, le=1.0)
    max_det: int = Field(100, ge=1)
    pre_nms_topk: int = Field(1000, ge=1)


def _describe_arg_error(err: dict[str, Any], name: str, schema: type[Section]) -> str:
    key = "model.backbone.args." + ".".join(map(str, err["loc"]))
    valid = list(schema.model_fields)
    if err["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        return f"unknown key '{key}'.{did_you_mean} Valid keys of {name}'s args: {', '.join(valid) or 'none'}"
    return f"'{key}': {err['msg']} (got {err.get('input')!r})"


# The parts of a detector `model.freeze` may name.
FREEZABLE = ("backbone", "neck", "projector", "head")


class ModelConfig(Section):
    backbone: BackboneConfig = BackboneConfig()
    neck: NeckConfig = NeckConfig()
    projector: ProjectorConfig = ProjectorConfig()
    head: HeadConfig = HeadConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    # A whole detector's starting weights: a detpact checkpoint (its EMA weights when it
    # has them), a raw state dict, a {model | state_dict | model_state_dict | ema |
    # ema_model | teacher} payload or a .safetensors file. Tensors whose shape differs
    # (e.g. a head with another class count) are left at their initial values.
    init_from: str | None = None
    # Parts whose parameters are not trained.
    freeze: list[Literal["backbone", "neck", "projector", "head"]] = []
    # BatchNorm layers of the whole model keep their statistics (eval mode) in training.
    freeze_bn: bool = False
    # A light decoder that reconstructs masked patches of the input from the backbone's P3
    # features (models/mim.py), trained with the detector: what test-time training's
    # mim_safe preset adapts with (docs/robustness.md). Not part of the exported model.
    mim_decoder: bool = False
    # The weight of its reconstruction loss, logged as loss_mim.
    mim_weight: float = Field(1.0, ge=0.0)

    @model_validator(mode="after")
    def _rtdetr_defaults(self) -> ModelConfig:
        if self.head.name == "rtdetr":
            if "neck" not in self.model_fields_set:
                self.neck = NeckConfig(name="none")  # the head fuses scales itself
            if self.projector.d_model is None:
                self.projector = ProjectorConfig(d_model=256)
            d_model, heads = self.projector.d_model, self.head.rtdetr.num_heads
            if d_model % heads or d_model % 4:
                raise ValueError(f"model.head.rtdetr.num_heads ({heads}) must divide model.projector.d_model "
                                 f"({d_model}), and d_model must be a multiple of 4 (e.g. 256 with 8 heads)")
        return self
