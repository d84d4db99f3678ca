"""TinyCNN (`tiny_cnn`): the smallest, fastest baseline, plain stride-2 conv stages."""

from __future__ import annotations

from torch import Tensor, nn

from detpact.config import BackboneConfig
from detpact.config.model import TinyCNNArgs
from detpact.models.backbones.norms import make_norm
from detpact.models.backbones.stages import pyramid


def conv_norm_act(c_in: int, c_out: int, stride: int, norm: str) -> nn.Sequential:
    """3x3 conv (no bias) -> norm -> SiLU; 'same' padding, so the size shrinks by `stride`."""
    # YOLO's BN settings (as layers.ConvBNAct): a slower running-stat update suits small batches.
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                         make_norm(norm, c_out, eps=1e-3, momentum=0.03), nn.SiLU(inplace=True))


class TinyCNN(nn.Module):
    """A stride-2 stem conv with `width` channels, then four stages of (3x3 conv stride 2,
    3x3 conv), each doubling the channels: width 16 gives P3/P4/P5 of 64/128/256 channels.

    forward(x [B, 3, H, W]) -> (P3, P4, P5): [B, out_channels[i], H / s, W / s] for s = 8, 16, 32.
    """

    strides = (8, 16, 32)

    def __init__(self, args: TinyCNNArgs | dict, norm: str = "bn"):
        super().__init__()
        args = TinyCNNArgs.model_validate(args) if isinstance(args, dict) else args
        c = [args.width * 2**i for i in range(5)]
        self.stem = conv_norm_act(3, c[0], 2, norm)  # stride 2
        self.stages = nn.ModuleList(
            nn.Sequential(conv_norm_act(c[i], c[i + 1], 2, norm), conv_norm_act(c[i + 1], c[i + 1], 1, norm))
            for i in range(4))  # strides 4, 8, 16, 32
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return pyramid(self.stem(x), self.stages)


def tiny_cnn(cfg: BackboneConfig) -> TinyCNN:
    return TinyCNN(cfg.args, cfg.norm)
