"""The detector: backbone -> neck -> projector -> head, built from `cfg.model`."""

from __future__ import annotations

from torch import Tensor, nn

from detpact.config import ModelConfig
from detpact.models.backbones import build_backbone
from detpact.models.heads.dense import DenseHead
from detpact.models.heads.rtdetr import RTDETRHead
from detpact.models.mim import MIMDecoder
from detpact.models.necks import build_neck
from detpact.models.outputs import DetectorOutput, DetrOutput
from detpact.models.projector import NoProjector, Projector
from detpact.models.quant import QuantisedLinear


class Detector(nn.Module):
    """`forward(images, targets=None) -> DetectorOutput | DetrOutput` in train and eval mode alike.

    images: [B, 3, H, W] float RGB in [0, 1], H and W multiples of 32 (letterboxed).
    targets: the batch's ground truth (B dicts of "boxes" [N, 4] xyxy pixels and "labels"
    [N]); only the rtdetr head reads them, in training, to build its denoising queries.
    The loss (`losses.build_criterion`) and postprocessing (`postprocess.py`) are separate
    steps on the output; `nms_free` says which decoding the output needs.
    `mim_decoder` (model.mim_decoder, else None) is no part of forward: its masked-image
    loss (models/mim.py) trains with the detector, for test-time training.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, projector: nn.Module, head: nn.Module,
                 mim_decoder: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.projector = projector
        self.head = head
        self.mim_decoder = mim_decoder

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def nms_free(self) -> bool:
        return self.head.nms_free

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput | DetrOutput:
        feats = self.projector(self.neck(self.backbone(images)))
        return self.head(feats, targets)


def build_model(cfg: ModelConfig, num_classes: int) -> Detector:
    backbone = build_backbone(cfg.backbone)
    neck = build_neck(cfg.neck, backbone.out_channels)
    d_model = cfg.projector.d_model
    projector = Projector(neck.out_channels, d_model) if d_model else NoProjector(neck.out_channels)
    if cfg.head.name == "rtdetr":
        head = RTDETRHead(projector.out_channels, num_classes, cfg.head.rtdetr)
    else:
        head = DenseHead(projector.out_channels, num_classes, cfg.head.reg_max, cfg.head.cls_conv == "depthwise")
    mim_decoder = MIMDecoder(backbone.out_channels[0]) if cfg.mim_decoder else None
    return Detector(backbone, neck, projector, head, mim_decoder)


def count_parameters(model: nn.Module) -> int:
    """Every weight of the model, the frozen quantised ones of train.quant included (they are no parameters)."""
    quantised = sum(m.base.numel() for m in model.modules() if isinstance(m, QuantisedLinear))
    return sum(p.numel() for p in model.parameters()) + quantised
