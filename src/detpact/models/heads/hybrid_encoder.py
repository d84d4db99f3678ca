"""RT-DETR's hybrid encoder: attention within P5 (AIFI), then CNN fusion across scales (CCFM).

Self-attention over every position of every level is what makes Deformable-DETR's
encoder slow; RT-DETR attends only among the few, semantically rich P5 tokens and
leaves the cross-scale exchange to a cheap FPN + PAN of convolutions. The input maps
already have d_model channels (the detector's Projector runs before the head), so,
unlike RT-DETR's HybridEncoder, there is no input projection here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.models.layers import ConvBN, ConvBNAct


def sincos_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0,
                              device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos embedding of an h x w grid, row-major like `x.flatten(2)` -> [1, h*w, dim].

    Channels are [sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)] with dim / 4 frequencies
    w_k = temperature^(-k / (dim / 4)). RT-DETR builds its grid w-major; on square maps
    that gives exactly this layout, and on non-square maps this one stays a true
    function of (x, y).
    """
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)  # [dim/4]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    out_y = ys.reshape(-1, 1) * omega  # [h*w, dim/4]
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)[None]


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; the position embedding goes into queries and keys only."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: [B, N, d] tokens, pos: [1, N, d] -> [B, N, d]."""
        q = k = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(q, k, x, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.gelu(self.linear1(x))))
        return self.norm2(x + self.dropout2(ffn))


class RepVGGBlock(nn.Module):
    """3x3 conv-BN + 1x1 conv-BN, summed, then SiLU (RepVGG's training form).

    The two branches could be folded into one 3x3 conv for deployment; the exported
    graph keeps both, which costs a little speed and nothing in accuracy.
    """

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = ConvBN(c, c, 3)
        self.conv2 = ConvBN(c, c, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepLayer(nn.Module):
    """Two 1x1 branches of `expansion * c_out` channels, RepVGG blocks on one, summed, then
    a 1x1 conv to c_out (skipped when the widths already agree)."""

    def __init__(self, c_in: int, c_out: int, num_blocks: int, expansion: float):
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = ConvBNAct(c_in, hidden, 1)
        self.conv2 = ConvBNAct(c_in, hidden, 1)
        self.blocks = nn.Sequential(*(RepVGGBlock(hidden) for _ in range(num_blocks)))
        self.conv3 = ConvBNAct(hidden, c_out, 1) if hidden != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.blocks(self.conv1(x)) + self.conv2(x))


class HybridEncoder(nn.Module):
    """(P3, P4, P5), each [B, d, H_l, W_l] -> the fused (P3, P4, P5), same shapes.

    AIFI: `num_layers` encoder layers on the flattened P5 tokens. CCFM: top-down
    (1x1 lateral conv, nearest 2x upsample, concat with the finer map, CSPRepLayer),
    then bottom-up (3x3 stride-2 conv, concat with the top-down map, CSPRepLayer).
    """

    def __init__(self, d_model: int, num_heads: int, num_layers: int, dim_feedforward: int, dropout: float,
                 depth_mult: float, expansion: float, temperature: float = 10000.0):
        super().__init__()
        self.temperature = temperature
        self.aifi = nn.ModuleList(EncoderLayer(d_model, num_heads, dim_feedforward, dropout) for _ in range(num_layers))
        blocks = round(3 * depth_mult)
        # Index 0 works on the P5 -> P4 step (top-down) and the P3 -> P4 step (bottom-up).
        self.lateral_convs = nn.ModuleList(ConvBNAct(d_model, d_model, 1) for _ in range(2))
        self.fpn_blocks = nn.ModuleList(CSPRepLayer(2 * d_model, d_model, blocks, expansion) for _ in range(2))
        self.downsample_convs = nn.ModuleList(ConvBNAct(d_model, d_model, 3, 2) for _ in range(2))
        self.pan_blocks = nn.ModuleList(CSPRepLayer(2 * d_model, d_model, blocks, expansion) for _ in range(2))

    def forward(self, feats: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = feats
        if len(self.aifi):
            _, c, h, w = p5.shape
            tokens = p5.flatten(2).transpose(1, 2)  # [B, h*w, d]
            # Computed from the map size at run time: any input size, nothing to store.
            pos = sincos_position_embedding(h, w, c, self.temperature, tokens.device).to(tokens.dtype)
            for layer in self.aifi:
                tokens = layer(tokens, pos)
            p5 = tokens.transpose(1, 2).unflatten(2, (h, w))
        # Top-down: each coarser map, after its lateral conv, is both the next step's
        # input and the bottom-up path's partner at its scale.
        top5 = self.lateral_convs[0](p5)
        top4 = self.lateral_convs[1](self.fpn_blocks[0](torch.cat([_upsample(top5), p4], dim=1)))
        out3 = self.fpn_blocks[1](torch.cat([_upsample(top4), p3], dim=1))
        out4 = self.pan_blocks[0](torch.cat([self.downsample_convs[0](out3), top4], dim=1))
        out5 = self.pan_blocks[1](torch.cat([self.downsample_convs[1](out4), top5], dim=1))
        return out3, out4, out5


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
