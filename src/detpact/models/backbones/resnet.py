"""ResNet-18/34/50 (`resnet18`, `resnet34`, `resnet50`) in torchvision's layout.

Module names and tensor shapes are exactly those of `torchvision.models.resnetXX()`
without its classifier (`fc`), so torchvision's ImageNet weight files load strictly once
their two `fc.*` tensors are dropped.
"""

from __future__ import annotations

from torch import Tensor, nn

from detpact.config import BackboneConfig
from detpact.models.backbones.norms import make_norm


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first with the stride) plus the shortcut: resnet18/34's block."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, norm: str):
        super().__init__()
        self.conv1 = conv3x3(c_in, planes, stride)
        self.bn1 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = make_norm(norm, planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride, as torchvision's "ResNet v1.5"), 1x1 expand x4, plus
    the shortcut: resnet50's block."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None, norm: str):
        super().__init__()
        self.conv1 = conv1x1(c_in, planes)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = make_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def make_layer(block: type[BasicBlock | Bottleneck], c_in: int, planes: int, n: int, stride: int,
               norm: str) -> nn.Sequential:
    """n blocks; the first takes the stride and, when the shape changes, a 1x1 conv + norm
    shortcut (torchvision's `downsample`)."""
    c_out = planes * block.expansion
    downsample = None
    if stride != 1 or c_in != c_out:
        downsample = nn.Sequential(conv1x1(c_in, c_out, stride), make_norm(norm, c_out))
    blocks = [block(c_in, planes, stride, downsample, norm)]
    blocks += [block(c_out, planes, 1, None, norm) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):
    """A 7x7 stride-2 stem conv and 3x3 stride-2 max-pool (stride 4), then layer1..layer4 at
    strides 4, 8, 16, 32; P3, P4, P5 are the outputs of layer2, layer3, layer4.

    forward(x [B, 3, H, W]) -> (P3, P4, P5): [B, out_channels[i], H / s, W / s] for s = 8, 16, 32.
    """

    strides = (8, 16, 32)

    def __init__(self, block: type[BasicBlock | Bottleneck], depths: tuple[int, int, int, int], norm: str = "bn"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = [64] + [planes * block.expansion for planes in (64, 128, 256, 512)]  # channels in, then after each layer
        self.layer1 = make_layer(block, c[0], 64, depths[0], 1, norm)
        self.layer2 = make_layer(block, c[1], 128, depths[1], 2, norm)
        self.layer3 = make_layer(block, c[2], 256, depths[2], 2, norm)
        self.layer4 = make_layer(block, c[3], 512, depths[3], 2, norm)
        self.out_channels = (c[2], c[3], c[4])
        # torchvision's initialisation (its default zero_init_residual=False; norms start at 1 / 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        p3 = self.layer2(self.layer1(x))
        p4 = self.layer3(p3)
        p5 = self.layer4(p4)
        return p3, p4, p5


# args.drop_path (TorchvisionArgs) applies to convnext_tiny only; ResNets have no stochastic depth.
def resnet18(cfg: BackboneConfig) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), cfg.norm)


def resnet34(cfg: BackboneConfig) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), cfg.norm)


def resnet50(cfg: BackboneConfig) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), cfg.norm)
