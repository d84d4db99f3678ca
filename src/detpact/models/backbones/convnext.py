"""ConvNeXt-T (`convnext_tiny`) in torchvision's layout.

Module names and tensor shapes are exactly those of `torchvision.models.convnext_tiny()`
without its classifier (`classifier.*`), so torchvision's ImageNet weight files load
strictly once those four tensors are dropped. `features` alternates stages and
downsampling layers:

    features.0  stem: 4x4 stride-4 conv + LayerNorm2d             stride 4,  96 ch
    features.1  3 CNBlocks                                        stride 4,  96 ch
    features.2  LayerNorm2d + 2x2 stride-2 conv                   stride 8
    features.3  3 CNBlocks                                  -> P3 stride 8,  192 ch
    features.4  downsampling                                      stride 16
    features.5  9 CNBlocks                                  -> P4 stride 16, 384 ch
    features.6  downsampling                                      stride 32
    features.7  3 CNBlocks                                  -> P5 stride 32, 768 ch
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config import BackboneConfig
from detpact.config.model import TorchvisionArgs

DEPTHS = (3, 3, 9, 3)
DIMS = (96, 192, 384, 768)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (torchvision's: permute, normalise, permute back)."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    """x.permute(*dims), as a module so that CNBlock's Sequential indices match torchvision's."""

    def __init__(self, dims: tuple[int, ...]):
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth ("row" mode): zero the whole residual branch of a random fraction p
    of the samples, scale the rest by 1 / (1 - p). Identity in eval mode or when p is 0.
    Draws from torch's global RNG, so a seeded run is reproducible. x: [B, ...]."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


class CNBlock(nn.Module):
    """x + drop_path(layer_scale * MLP(LayerNorm(dwconv7x7(x)))): the ConvNeXt block.

    `block` indices as torchvision's: 0 dwconv, 1 to [B, H, W, C], 2 LayerNorm, 3 Linear
    C -> 4C, 4 GELU, 5 Linear 4C -> C, 6 back to [B, C, H, W]. x: [B, C, H, W] -> same.
    """

    def __init__(self, dim: int, drop_path: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim),
            Permute((0, 2, 3, 1)),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute((0, 3, 1, 2)),
        )
        # Each residual branch starts almost switched off (ConvNeXt's 1e-6 layer scale).
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        return x + drop_path(self.layer_scale * self.block(x), self.drop_path, self.training)


class ConvNeXt(nn.Module):
    """ConvNeXt backbone (module docstring has the layout).

    forward(x [B, 3, H, W]) -> (P3, P4, P5): [B, out_channels[i], H / s, W / s] for s = 8, 16, 32.
    `drop_path` is the stochastic-depth rate of the last block; it rises linearly from 0
    at the first block.
    """

    strides = (8, 16, 32)

    def __init__(self, depths: tuple[int, ...] = DEPTHS, dims: tuple[int, ...] = DIMS, drop_path: float = 0.0):
        super().__init__()
        total, done = sum(depths), 0
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            rates = [drop_path * (done + j) / (total - 1) for j in range(depth)]
            layers.append(nn.Sequential(*(CNBlock(dim, rate) for rate in rates)))
            done += depth
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.out_channels = (dims[1], dims[2], dims[3])
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        for i in range(4):  # stem, stage 1 (stride 4), downsampling, stage 2
            x = self.features[i](x)
        p3 = x
        p4 = self.features[5](self.features[4](p3))
        p5 = self.features[7](self.features[6](p4))
        return p3, p4, p5


def convnext_tiny(cfg: BackboneConfig) -> ConvNeXt:
    # LayerNorm throughout: the config only admits norm bn here (nothing to replace).
    return ConvNeXt(DEPTHS, DIMS, TorchvisionArgs.model_validate(cfg.args).drop_path)
