"""The rtdetr head: output contract, denoising groups and mask, gradients, determinism, ONNX."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detpact.config.model import RTDETRConfig
from detpact.models.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from detpact.models.heads.deformable import gather_bilinear
from detpact.models.heads.denoising import build_denoising_queries, denoising_attention_mask
from detpact.models.heads.rtdetr import RTDETRHead

D_MODEL, CLASSES, QUERIES, LAYERS = 32, 3, 20, 2
H, W = 64, 96
SCALE = torch.tensor([W, H, W, H], dtype=torch.float32)


def tiny_cfg(**overrides) -> RTDETRConfig:
    base = dict(num_queries=QUERIES, num_decoder_layers=LAYERS, num_heads=2, num_points=2, dim_feedforward=64,
                encoder_ffn=64, depth_mult=0.34, num_denoising=12)
    return RTDETRConfig(**{**base, **overrides})


def make_head(seed: int = 0, **overrides) -> RTDETRHead:
    torch.manual_seed(seed)
    return RTDETRHead((D_MODEL,) * 3, CLASSES, tiny_cfg(**overrides))


def feats(batch: int = 2, seed: int = 1) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, D_MODEL, H // s, W // s, generator=g) for s in (8, 16, 32))


def targets() -> list[dict[str, Tensor]]:
    """Image 0: three boxes, image 1: none, image 2: one."""
    return [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [50.0, 10.0, 90.0, 60.0], [20.0, 20.0, 30.0, 50.0]]),
         "labels": torch.tensor([0, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[0.0, 0.0, 96.0, 64.0]]), "labels": torch.tensor([1])},
    ]


def test_train_output_contract():
    head = make_head().train()
    out = head(feats(3), targets())
    assert out.image_size == (H, W)
    assert out.cls_logits.shape == (3, QUERIES, CLASSES) and out.boxes.shape == (3, QUERIES, 4)
    assert len(out.layers) == LAYERS and out.layers[-1].logits is out.cls_logits
    for pred in [*out.layers, out.encoder, *out.denoising]:
        assert pred.boxes.dtype == torch.float32 and 0 <= pred.boxes.min() and pred.boxes.max() <= 1
    assert out.encoder.logits.shape == (3, QUERIES, CLASSES)
    groups = out.dn_groups
    # max_gt 3 -> 12 // 3 = 4 groups of 2 * 3 queries.
    assert (groups.num_groups, groups.num_queries) == (4, 24)
    assert len(out.denoising) == LAYERS and out.denoising[0].boxes.shape == (3, 24, 4)
    assert [len(p) for p in groups.positive_idx] == [12, 0, 4]
    torch.testing.assert_close(groups.positive_idx[2], torch.tensor([0, 6, 12, 18]))
    torch.testing.assert_close(groups.target_idx[0], torch.tensor([0, 1, 2] * 4))


def test_positive_denoising_queries_start_near_their_source_box():
    """Each positive query's first-layer box (its noised reference, as the box heads start
    at zero) lies within half a side of its target box per corner: positive_idx and
    target_idx through the whole head. A negative, or another box, would not."""
    head = make_head(label_noise_ratio=0.0).train()
    batch = targets()
    out = head(feats(3), batch)
    for i, t in enumerate(batch):
        idx, tgt = out.dn_groups.positive_idx[i], out.dn_groups.target_idx[i]
        source = t["boxes"][tgt] / SCALE  # [P, 4] normalised xyxy
        half = box_xyxy_to_cxcywh(source)[:, 2:].repeat(1, 2) / 2
        shift = (box_cxcywh_to_xyxy(out.denoising[0].boxes[i, idx]) - source).abs() / half
        assert shift.numel() == 0 or shift.max() <= 1 + 1e-3


def test_box_noise_keeps_positives_near_and_negatives_away():
    torch.manual_seed(3)
    embed = nn.Embedding(CLASSES + 1, D_MODEL, padding_idx=CLASSES)
    boxes = torch.tensor([[30.0, 20.0, 60.0, 40.0], [10.0, 10.0, 20.0, 30.0]])
    batch = [{"boxes": boxes, "labels": torch.tensor([0, 2])}]
    dn = build_denoising_queries(batch, (H, W), embed, QUERIES, 40, 0.0, 1.0, torch.device("cpu"))
    source = batch[0]["boxes"] / SCALE  # [2, 4] xyxy, normalised, away from the image border
    half = box_xyxy_to_cxcywh(source)[:, 2:].repeat(1, 2) / 2  # [2, 4]
    noised = box_cxcywh_to_xyxy(dn.ref_logits[0].sigmoid())  # [D, 4]
    slot = torch.arange(dn.groups.num_queries)
    shift = (noised - source[slot % 2]).abs() / half[slot % 2]  # in half-sides
    negative = (slot // 2) % 2 == 1
    assert shift[~negative].max() <= 1 + 1e-3
    # Negatives move further, unless clipped at the border or their corners crossed (a
    # box of width or height 0 then, as in RT-DETR): check the others.
    unclipped = (noised > 1e-4) & (noised < 1 - 1e-4)  # [D, 4]
    uncrossed = (noised[:, 2:] - noised[:, :2] > 1e-4).all(-1, keepdim=True)  # [D, 1]
    checked = unclipped & uncrossed & negative[:, None]
    assert checked.sum() > 40 and shift[checked].min() >= 1 - 1e-3
    # With no label noise, every copy's content is its class's embedding.
    torch.testing.assert_close(dn.content[0], embed(batch[0]["labels"][slot % 2]))


def test_attention_mask_blocks_answers_and_other_groups():
    per_group, groups, queries = 4, 3, 5
    dn = per_group * groups
    mask = denoising_attention_mask(dn, per_group, queries, torch.device("cpu"))
    assert mask.shape == (dn + queries, dn + queries)
    assert mask[dn:, :dn].all() and not mask[dn:, dn:].any()  # matching: no dn, all matching
    assert not mask[:dn, dn:].any()  # denoising queries may look at the matching ones
    group = torch.arange(dn) // per_group
    torch.testing.assert_close(mask[:dn, :dn], group[:, None] != group[None, :])
    assert not mask.diagonal().any()  # no fully blocked row (NaN attention)


def test_matching_queries_do_not_see_denoising_queries():
    """In training (dropout 0), the matching queries' predictions are the same with or
    without denoising queries in the batch."""
    head = make_head().train()
    x = feats(3)
    plain = head(x, None)
    with_dn = head(x, targets())
    assert plain.denoising is None and with_dn.denoising is not None
    for a, b in zip(plain.layers, with_dn.layers):
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-5, rtol=1e-5)


def test_no_targets_in_the_batch_means_no_denoising():
    head = make_head().train()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = head(feats(2), empty)
    assert out.denoising is None and out.dn_groups is None
    assert len(out.layers) == LAYERS and out.encoder is not None
    off = make_head(denoising=False).train()
    assert not hasattr(off, "label_embed")
    assert off(feats(2), targets()[:2]).denoising is None


def test_eval_output_is_the_last_layer_only():
    head = make_head().eval()
    x = feats(3)
    with torch.no_grad():
        out = head(x, targets())  # targets are ignored in eval
        singles = [head(tuple(f[i : i + 1] for f in x)) for i in range(3)]
    assert len(out.layers) == 1 and out.encoder is None and out.denoising is None and out.dn_groups is None
    assert out.boxes.dtype == torch.float32
    torch.testing.assert_close(out.boxes, box_cxcywh_to_xyxy(out.layers[0].boxes) * SCALE)
    centres = box_xyxy_to_cxcywh(out.boxes)[..., :2]
    assert (centres >= 0).all() and (centres[..., 0] <= W).all() and (centres[..., 1] <= H).all()
    for i, single in enumerate(singles):  # batched == per image
        torch.testing.assert_close(single.boxes[0], out.boxes[i], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(single.cls_logits[0], out.cls_logits[i], atol=1e-4, rtol=1e-4)


def test_boxes_stay_float32_under_bf16_autocast():
    head = make_head().eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(feats(1))
    assert out.boxes.dtype == torch.float32 and out.layers[0].boxes.dtype == torch.float32
    assert torch.isfinite(out.boxes).all()


def test_backward_reaches_every_parameter():
    head = make_head().train()
    out = head(feats(3), targets())
    preds = [*out.layers, out.encoder, *out.denoising]
    loss = sum(p.logits.float().sigmoid().sum() + p.boxes.sum() for p in preds)
    loss.backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert not missing, missing
    # The box MLPs' last layers start at zero, which stops the gradient into their hidden
    # layers at step 0; everything else learns from the first step.
    zero = [n for n, p in head.named_parameters() if not p.grad.abs().sum() > 0]
    assert all("bbox_head" in n and ".layers.2." not in n for n in zero), zero
    assert head.label_embed.weight.grad[:-1].abs().sum(-1).gt(0).all()  # every class row, via denoising
    assert not head.label_embed.weight.grad[-1].any()  # the padding row stays fixed


def test_same_seed_same_training_forward():
    head = make_head(dropout=0.1).train()  # dropout on: the seed drives it too
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(head(feats(3), targets()))
    a, b, c = runs
    for x, y in zip([*a.layers, *a.denoising, a.encoder], [*b.layers, *b.denoising, b.encoder]):
        assert torch.equal(x.logits, y.logits) and torch.equal(x.boxes, y.boxes)
    assert not torch.equal(a.denoising[0].boxes, c.denoising[0].boxes)  # the noise follows the seed


def test_num_heads_must_divide_d_model():
    with pytest.raises(ValueError, match="num_heads"):
        RTDETRHead((D_MODEL,) * 3, CLASSES, tiny_cfg(num_heads=3))


class StandIn(nn.Module):
    """images [B, 3, 64, 64] -> (boxes [B, Q, 4] xyxy pixels, scores [B, Q, C]) through the head."""

    def __init__(self, head: RTDETRHead):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, D_MODEL, 1) for _ in range(3))
        self.head = head

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        maps = tuple(conv(F.avg_pool2d(images, s)) for conv, s in zip(self.convs, (8, 16, 32)))
        out = self.head(maps)
        return out.boxes, out.cls_logits.float().sigmoid()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the exporter's own deprecation notices
def test_onnx_export_matches_torch(tmp_path):
    model = StandIn(make_head()).eval()
    path = tmp_path / "head.onnx"
    torch.onnx.export(model, (torch.rand(2, 3, 64, 64),), str(path), dynamo=True, external_data=False, verbose=False,
                      opset_version=18, input_names=["images"], output_names=["boxes", "scores"],
                      dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=64)}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        images = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            boxes, scores = model(images)
        onnx_boxes, onnx_scores = session.run(None, {"images": images.numpy()})
        assert onnx_boxes.shape == (batch, QUERIES, 4) and onnx_scores.shape == (batch, QUERIES, CLASSES)
        assert np.abs(onnx_boxes - boxes.numpy()).max() < 1e-3
        assert np.abs(onnx_scores - scores.numpy()).max() < 1e-4


def test_gather_bilinear_matches_grid_sample():
    """The deterministic CUDA training path samples exactly as grid_sample, gradients included."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grid = (torch.rand(3, 6, 8, 2, generator=g, dtype=torch.float64) * 2.6 - 1.3).requires_grad_()  # some outside
    ours = gather_bilinear(v, grid)
    theirs = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(ours, theirs)
    weights = torch.randn(theirs.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((ours * weights).sum(), (v, grid))
    expected = torch.autograd.grad((theirs * weights).sum(), (v, grid))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)
