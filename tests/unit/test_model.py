"""Detector contract, assigner, criterion and postprocessing."""

from __future__ import annotations

import pytest
import torch

from detpact.config import AssignerConfig, HeadConfig, ModelConfig, PostprocessConfig
from detpact.models.detector import build_model
from detpact.models.losses import build_criterion
from detpact.models.matching import CenterSamplingAssigner, build_assigner
from detpact.models.postprocess import postprocess

TINY = ModelConfig.model_validate({"backbone": {"args": {"width_mult": 0.0625, "depth_mult": 0.33}}})
# The YOLOv8/11-style recipe: task-aligned assignment, DFL box bins, CIoU.
ALIGNED_HEAD = {"reg_max": 16, "assigner": {"name": "task_aligned"}, "loss": {"iou": "ciou", "quality_gamma": 0.0}}
HEADS = {"centre_sampling": {}, "task_aligned_dfl": ALIGNED_HEAD}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY, num_classes=3)


def test_output_contract(model):
    out = model.eval()(torch.rand(2, 3, 64, 96))
    locations = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    assert out.cls_logits.shape == (2, locations, 3)
    assert out.boxes.shape == (2, locations, 4) and out.boxes.dtype == torch.float32
    assert out.points.shape == (locations, 2) and out.strides.shape == (locations,)
    assert set(out.strides.unique().tolist()) == {8.0, 16.0, 32.0}
    # Every box contains its own location point (distances are positive by construction).
    px, py = out.points[:, 0], out.points[:, 1]
    assert torch.all((out.boxes[..., 0] <= px) & (px <= out.boxes[..., 2]))
    assert torch.all((out.boxes[..., 1] <= py) & (py <= out.boxes[..., 3]))


def test_batched_equals_single_image(model):
    images = torch.rand(3, 3, 64, 64)
    model.eval()
    batched = model(images)
    for i in range(3):
        single = model(images[i : i + 1])
        torch.testing.assert_close(single.cls_logits[0], batched.cls_logits[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single.boxes[0], batched.boxes[i], atol=1e-3, rtol=1e-4)


def test_width_and_depth_mult_scale_the_model():
    def n_params(width, depth):
        cfg = ModelConfig.model_validate({"backbone": {"args": {"width_mult": width, "depth_mult": depth}}})
        return sum(p.numel() for p in build_model(cfg, 3).parameters())

    assert n_params(0.25, 0.33) > n_params(0.125, 0.33) > n_params(0.0625, 0.33)
    assert n_params(0.125, 1.0) > n_params(0.125, 0.33)


def grid(size=64):
    ys, xs = torch.meshgrid(torch.arange(size // 8) * 8 + 4.0, torch.arange(size // 8) * 8 + 4.0, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1)
    return points, torch.full((len(points),), 8.0)


def test_assigner_empty_targets_give_all_background():
    assigner = CenterSamplingAssigner()
    points, strides = grid()
    for num_gt in (0, 2):  # no boxes at all, and a batch where every box is padding
        matched = assigner.match(points, strides, torch.zeros(2, num_gt, 4), torch.zeros(2, num_gt, dtype=torch.bool))
        assert matched.shape == (2, len(points)) and torch.all(matched == -1)


def test_assigner_centre_sampling_and_smallest_box_wins():
    assigner = CenterSamplingAssigner(center_radius=1.5)
    points, strides = grid()
    big = [4.0, 4.0, 60.0, 60.0]
    small = [20.0, 20.0, 44.0, 44.0]  # same centre, inside big
    boxes = torch.tensor([[big, small]])
    matched = assigner.match(points, strides, boxes, torch.tensor([[True, True]]))[0]
    pos = matched >= 0
    assert pos.any()
    # Positives lie within 1.5 strides of the centre (32, 32) on both axes ...
    assert torch.all((points[pos] - 32).abs() < 12)
    # ... and where both boxes claim a location the smaller one wins.
    assert torch.all(matched[pos] == 1)


def test_assigner_sends_big_boxes_to_coarse_levels():
    assigner = build_assigner(AssignerConfig(name="center_sampling", range_strides=[4.0, 4.0]))  # P3 <= 32 px, P4 <= 64 px
    points = torch.tensor([[128.0, 128.0]] * 3)
    strides = torch.tensor([8.0, 16.0, 32.0])
    small = torch.tensor([[[118.0, 118.0, 138.0, 138.0]]])  # max distance 10 -> P3
    large = torch.tensor([[[28.0, 28.0, 228.0, 228.0]]])  # max distance 100 -> P5
    valid = torch.ones(1, 1, dtype=torch.bool)
    assert assigner.match(points, strides, small, valid)[0].tolist() == [0, -1, -1]
    assert assigner.match(points, strides, large, valid)[0].tolist() == [-1, -1, 0]


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_criterion_handles_images_without_objects(head):
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"head": HeadConfig.model_validate(head)})
    model = build_model(cfg, num_classes=3)
    criterion = build_criterion(cfg.head)
    model.train()
    out = model(torch.rand(2, 3, 64, 64))
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = criterion(out, targets)
    assert torch.isfinite(losses["loss"]) and losses["loss_box"] == 0 and losses["num_pos"] == 0
    losses["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


@pytest.mark.parametrize("head", HEADS.values(), ids=HEADS.keys())
def test_criterion_learns_a_batch(head):
    """A few optimizer steps on one batch must cut the loss: the loss is wired to the outputs."""
    torch.manual_seed(0)
    cfg = TINY.model_copy(update={"head": HeadConfig.model_validate(head)})
    net = build_model(cfg, num_classes=3).train()
    criterion = build_criterion(cfg.head)
    images = torch.rand(4, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([i % 3])} for i in range(4)]
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        loss = criterion(net(images), targets)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_postprocess_threshold_nms_and_max_det():
    # 4 locations, 2 classes: two near-identical boxes of class 0, one box of class 1.
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [40, 40, 50, 50.0]]])
    probs = torch.tensor([[[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.0005, 0.0]]])
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    cfg = PostprocessConfig(score_threshold=0.001, iou_threshold=0.5, max_det=10)
    (det,) = postprocess(logits, boxes, cfg)
    assert det.labels.tolist() == [0, 1]  # duplicate suppressed, sub-threshold dropped
    torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.7]), atol=1e-5, rtol=0)
    (det,) = postprocess(logits, boxes, cfg.model_copy(update={"max_det": 1}))
    assert len(det.scores) == 1
    (det,) = postprocess(torch.full_like(logits, -20.0), boxes, cfg)
    assert det.boxes.shape == (0, 4)



def test_nms_free_postprocess_keeps_the_best_max_det_without_suppression():
    # Two near-identical boxes of one class: NMS would drop one, an NMS-free head keeps both.
    boxes = torch.tensor([[[0, 0, 10, 10], [0, 0, 10, 10.5], [20, 20, 30, 30], [40, 40, 50, 50.0]]])
    probs = torch.tensor([[[0.9, 0.0], [0.8, 0.6], [0.0, 0.7], [0.0005, 0.0]]])
    logits = torch.logit(probs.clamp(1e-6, 1 - 1e-6))
    cfg = PostprocessConfig(score_threshold=0.001, iou_threshold=0.5, max_det=3, pre_nms_topk=1)
    (det,) = postprocess(logits, boxes, cfg, nms=False)
    # The top 3 of queries x classes, best first; pre_nms_topk does not apply.
    assert list(zip(det.locations.tolist(), det.labels.tolist())) == [(0, 0), (1, 0), (2, 1)]
    torch.testing.assert_close(det.scores, torch.tensor([0.9, 0.8, 0.7]), atol=1e-5, rtol=0)
    (det,) = postprocess(logits, boxes, cfg.model_copy(update={"max_det": 10}), nms=False)
    assert len(det.scores) == 4  # every pair above the threshold: a query may give two classes
    (det,) = postprocess(torch.full_like(logits, -20.0), boxes, cfg, nms=False)
    assert det.boxes.shape == (0, 4)

YOLO11_BLOCKS = {"backbone": {"args": {"width_mult": 0.0625, "block": "c3k2", "attention": True}},
                 "neck": {"block": "c3k2"}, "head": {"reg_max": 8, "cls_conv": "depthwise"}}


def test_yolo11_blocks_keep_the_output_contract_and_batch_independence():
    torch.manual_seed(0)
    model = build_model(ModelConfig.model_validate(YOLO11_BLOCKS), num_classes=2).eval()
    names = {type(m).__name__ for m in model.modules()}
    assert {"C3k2", "C3k", "C2PSA", "PositionAttention", "DWConvBNAct"} <= names
    images = torch.rand(2, 3, 64, 96)
    out = model(images)
    locations = sum((64 // s) * (96 // s) for s in (8, 16, 32))
    assert out.cls_logits.shape == (2, locations, 2) and out.box_logits.shape == (2, locations, 4, 8)
    single = model(images[1:])
    torch.testing.assert_close(single.boxes[0], out.boxes[1], atol=1e-3, rtol=1e-4)


def test_the_projector_brings_every_level_to_d_model_for_the_dense_head():
    torch.manual_seed(0)
    cfg = ModelConfig.model_validate({"backbone": {"name": "tiny_cnn", "args": {"width": 8}}, "neck": {"name": "none"},
                                      "projector": {"d_model": 24}})
    model = build_model(cfg, num_classes=2).eval()
    assert model.projector.out_channels == (24, 24, 24)
    feats = model.projector(model.neck(model.backbone(torch.rand(1, 3, 64, 64))))
    assert [tuple(f.shape[1:]) for f in feats] == [(24, 8, 8), (24, 4, 4), (24, 2, 2)]
    out = model(torch.rand(2, 3, 64, 64))
    assert out.cls_logits.shape == (2, 84, 2) and not model.nms_free
