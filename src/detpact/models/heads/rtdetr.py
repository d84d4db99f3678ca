"""RT-DETR-style set-prediction head: hybrid encoder, query selection, deformable decoder.

    (P3, P4, P5) d_model each --HybridEncoder--> memory [B, L, d] (all levels' positions)
    memory --enc heads--> a class score and a box per position (relative to a grid anchor)
    top num_queries positions by best class score --> initial queries and reference boxes
    num_decoder_layers x (self-attention, deformable cross-attention, FFN, box refinement)

Each query predicts at most one object and the training matches queries to boxes one to
one, so the output needs no NMS (`nms_free`). In training, noised ground-truth copies
join as denoising queries (denoising.py). Boxes are computed in float32 (bf16 autocast
would quantise a logit-space box to ~1/256).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config.model import RTDETRConfig
from detpact.models.boxes import box_cxcywh_to_xyxy, inverse_sigmoid
from detpact.models.heads.deformable import MSDeformableAttention
from detpact.models.heads.denoising import DenoisingQueries, build_denoising_queries
from detpact.models.heads.hybrid_encoder import HybridEncoder
from detpact.models.outputs import DetrOutput, QueryPrediction

STRIDES = (8, 16, 32)
# Initial foreground probability of every class logit (RetinaNet's prior).
PRIOR_PROB = 0.01
# Anchor side at P3, doubled per level, as a fraction of the image (RT-DETR's grid_size).
ANCHOR_SIZE = 0.05
# Anchors with a coordinate within this of 0 or 1 (centres in the outermost cells of a
# fine map) are invalid: their logit would be extreme.
ANCHOR_EPS = 0.01


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them."""

    def __init__(self, c_in: int, hidden: int, c_out: int, num_layers: int):
        super().__init__()
        dims = [c_in] + [hidden] * (num_layers - 1) + [c_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DecoderLayer(nn.Module):
    """Post-norm: self-attention among the queries (position = MLP of the reference box, on
    queries and keys), deformable cross-attention into the memory, ReLU FFN."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float, num_levels: int,
                 num_points: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformableAttention(d_model, num_heads, num_levels, num_points)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(3))
        self.dropouts = nn.ModuleList(nn.Dropout(dropout) for _ in range(4))
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor, ref_boxes: Tensor, query_pos: Tensor, memory: Tensor, shapes: list[tuple[int, int]],
                attn_mask: Tensor | None) -> Tensor:
        """x, query_pos: [B, T, d]; ref_boxes: [B, T, 4] cxcywh in [0, 1]; memory [B, L, d];
        attn_mask: [T, T] bool, True = blocked, or None -> [B, T, d]."""
        q = k = x + query_pos
        x = self.norms[0](x + self.dropouts[0](self.self_attn(q, k, x, attn_mask=attn_mask, need_weights=False)[0]))
        x = self.norms[1](x + self.dropouts[1](self.cross_attn(x + query_pos, ref_boxes, memory, shapes)))
        ffn = self.linear2(self.dropouts[2](F.relu(self.linear1(x))))
        return self.norms[2](x + self.dropouts[3](ffn))


class RTDETRHead(nn.Module):
    """feats (P3, P4, P5), [B, d, H/s, W/s] for s = 8, 16, 32 -> DetrOutput.

    `forward(feats, targets)`: targets (B dicts of "boxes" [N, 4] xyxy pixels, "labels"
    [N] int64) are read only in training, for the denoising queries; None skips them.
    """

    nms_free = True  # one query per object: decode with a plain top-k

    def __init__(self, in_channels: tuple[int, ...], num_classes: int, cfg: RTDETRConfig):
        super().__init__()
        if len(in_channels) != len(STRIDES) or len(set(in_channels)) != 1:
            raise ValueError(f"the rtdetr head takes three maps (strides 8, 16, 32) of one width (d_model), "
                             f"got channels {tuple(in_channels)}: set model.projector.d_model")
        d = in_channels[0]
        if d % cfg.num_heads or d % 4:
            raise ValueError(f"model.head.rtdetr.num_heads ({cfg.num_heads}) must divide d_model ({d}, "
                             f"model.projector.d_model), and d_model must be a multiple of 4 (the 2-D sin-cos "
                             f"position embedding); e.g. d_model 256 with 8 heads")
        self.num_classes = num_classes
        self.num_queries = cfg.num_queries
        self.aux_loss = cfg.aux_loss
        self.denoising = cfg.denoising and cfg.num_denoising > 0
        self.num_denoising = cfg.num_denoising
        self.label_noise_ratio = cfg.label_noise_ratio
        self.box_noise_scale = cfg.box_noise_scale

        self.encoder = HybridEncoder(d, cfg.num_heads, cfg.encoder_layers, cfg.encoder_ffn, cfg.dropout,
                                     cfg.depth_mult, cfg.expansion)
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.enc_score_head = nn.Linear(d, num_classes)
        self.enc_bbox_head = MLP(d, d, 4, 3)
        self.query_pos_head = MLP(4, 2 * d, d, 2)
        self.decoder = nn.ModuleList(
            DecoderLayer(d, cfg.num_heads, cfg.dim_feedforward, cfg.dropout, len(STRIDES), cfg.num_points)
            for _ in range(cfg.num_decoder_layers))
        self.dec_score_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(cfg.num_decoder_layers))
        self.dec_bbox_heads = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.num_decoder_layers))
        if self.denoising:
            # One row per class plus a padding row (kept at zero) for the empty slots.
            # The default N(0, 1) init is RT-DETR's.
            self.label_embed = nn.Embedding(num_classes + 1, d, padding_idx=num_classes)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        # Box heads start at zero: the first boxes are the anchors, then the references.
        for score, box in [(self.enc_score_head, self.enc_bbox_head), *zip(self.dec_score_heads, self.dec_bbox_heads)]:
            nn.init.constant_(score.bias, bias)
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(self, feats: tuple[Tensor, ...], targets: list[dict[str, Tensor]] | None = None) -> DetrOutput:
        feats = self.encoder(feats)
        shapes = [(f.shape[2], f.shape[3]) for f in feats]
        image_size = (shapes[0][0] * STRIDES[0], shapes[0][1] * STRIDES[0])
        memory = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)  # [B, L, d]
        if memory.shape[1] < self.num_queries:
            raise ValueError(f"model.head.rtdetr.num_queries ({self.num_queries}) exceeds the {memory.shape[1]} "
                             f"positions of a {image_size[0]}x{image_size[1]} input: use larger images or fewer "
                             f"queries")

        content, ref_logits, encoder = self._select_queries(memory, shapes)
        dn = None
        if self.training and self.denoising and targets is not None:
            dn = build_denoising_queries(targets, image_size, self.label_embed, self.num_queries, self.num_denoising,
                                         self.label_noise_ratio, self.box_noise_scale, memory.device)
        if dn is not None:  # denoising queries first, as the attention mask expects
            content = torch.cat([dn.content.to(content.dtype), content], dim=1)
            ref_logits = torch.cat([dn.ref_logits, ref_logits], dim=1)
        preds = self._decode(content, ref_logits, memory, shapes, dn)

        num_dn = dn.groups.num_queries if dn is not None else 0
        layers = [QueryPrediction(p.logits[:, num_dn:], p.boxes[:, num_dn:]) for p in preds]
        denoising = None
        if dn is not None:
            denoising = [QueryPrediction(p.logits[:, :num_dn], p.boxes[:, :num_dn]) for p in preds]
        h, w = image_size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=memory.device)
        return DetrOutput(
            cls_logits=layers[-1].logits,
            boxes=box_cxcywh_to_xyxy(layers[-1].boxes) * scale,
            image_size=image_size,
            layers=layers,
            encoder=encoder if self.training else None,
            denoising=denoising,
            dn_groups=dn.groups if dn is not None else None,
        )

    def _select_queries(self, memory: Tensor, shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor, QueryPrediction]:
        """memory [B, L, d] -> content [B, Q, d], reference box logits [B, Q, 4] (both detached:
        the decoder must not steer the proposals) and the proposals' own prediction."""
        anchors, valid = _anchors(shapes, memory.device)  # [1, L, 4], [1, L, 1]
        # Invalid anchors get zeroed features and an infinite box logit (a box of ones if
        # selected): finite everywhere, and no gradient flows into the box head there.
        proposals = self.enc_output(memory * valid.to(memory.dtype))  # [B, L, d]
        logits = self.enc_score_head(proposals)  # [B, L, C]
        box_logits = self.enc_bbox_head(proposals).float() + anchors  # [B, L, 4]
        index = logits.max(-1).values.topk(self.num_queries, dim=1).indices  # [B, Q]
        top_logits = _gather(logits, index)
        top_box_logits = _gather(box_logits, index)
        encoder = QueryPrediction(top_logits, top_box_logits.sigmoid())
        return _gather(proposals, index).detach(), top_box_logits.detach(), encoder

    def _decode(self, x: Tensor, ref_logits: Tensor, memory: Tensor, shapes: list[tuple[int, int]],
                dn: DenoisingQueries | None) -> list[QueryPrediction]:
        """Iterative box refinement: each layer adds its box head's output to the logit of
        its reference box, and the result, detached, is the next layer's reference.

        Returns the predictions of every layer (training with aux_loss) or of the last,
        over all T = D + Q queries.
        """
        attn_mask = dn.attn_mask if dn is not None else None
        ref = ref_logits.sigmoid()  # [B, T, 4] float32, detached
        undetached = None
        preds = []
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            x = layer(x, ref, self.query_pos_head(ref.to(x.dtype)), memory, shapes, attn_mask)
            delta = self.dec_bbox_heads[i](x).float()
            boxes = (delta + inverse_sigmoid(ref)).sigmoid()
            if i == last or (self.training and self.aux_loss):
                # DINO's "look forward twice": in training, layer i's output also refines
                # the previous layer's undetached box, so its loss reaches that layer too.
                out = (delta + inverse_sigmoid(undetached)).sigmoid() if self.training and i > 0 else boxes
                preds.append(QueryPrediction(self.dec_score_heads[i](x), out))
            undetached = boxes
            ref = boxes.detach()
        return preds


def _anchors(shapes: list[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Grid-cell centres with sides ANCHOR_SIZE * 2^level, as logits: ([1, L, 4], valid [1, L, 1]).

    Invalid anchors (a coordinate within ANCHOR_EPS of the border) get +inf logits.
    """
    anchors = []
    for level, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], dim=-1)  # [h*w, 2]
        anchors.append(torch.cat([centres, torch.full_like(centres, ANCHOR_SIZE * 2.0**level)], dim=-1))
    anchors = torch.cat(anchors)[None]  # [1, L, 4]
    valid = ((anchors > ANCHOR_EPS) & (anchors < 1 - ANCHOR_EPS)).all(-1, keepdim=True)
    logits = torch.log(anchors / (1 - anchors))
    return torch.where(valid, logits, torch.inf), valid


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x [B, L, c], index [B, Q] -> [B, Q, c]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
