"""The detector: backbone -> neck -> head, built from `cfg.model`."""

from __future__ import annotations

from torch import Tensor, nn

from detpact.config import ModelConfig
from detpact.models.backbones import build_backbone
from detpact.models.heads.dense import DenseHead, DetectorOutput
from detpact.models.necks import build_neck


class Detector(nn.Module):
    """`forward(images) -> DetectorOutput` in train and eval mode alike.

    images: [B, 3, H, W] float RGB in [0, 1], H and W multiples of 32 (letterboxed).
    The loss (`losses.DetectionCriterion`) and postprocessing (`postprocess.py`) are
    separate steps on the output.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: DenseHead):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> DetectorOutput:
        return self.head(self.neck(self.backbone(images)))


def build_model(cfg: ModelConfig, num_classes: int) -> Detector:
    backbone = build_backbone(cfg.backbone)
    neck = build_neck(cfg.neck, backbone.out_channels)
    head = DenseHead(neck.out_channels, num_classes, cfg.head.reg_max, cfg.head.cls_conv == "depthwise")
    return Detector(backbone, neck, head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
