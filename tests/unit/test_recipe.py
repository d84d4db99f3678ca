"""The learning-recipe pieces: task-aligned assignment, DFL, CIoU, warm-start BatchNorm,
nominal batch and close-mosaic."""

from __future__ import annotations

import math

import pytest
import torch

from detpact.config import AugmentConfig, ModelConfig, TrainConfig, validate_config
from detpact.data.dataset import DetectionDataset
from detpact.engine.multiscale import MultiScale, rescale_batch
from detpact.engine.plan import plan_training
from detpact.errors import DetpactError
from detpact.models.boxes import paired_ciou, paired_iou
from detpact.models.detector import build_model
from detpact.models.layers import WarmStartBatchNorm2d
from detpact.models.losses import distribution_focal_loss
from detpact.models.matching import TaskAlignedAssigner
from detpact.models.outputs import DetectorOutput


def outputs_for(points: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor) -> DetectorOutput:
    """A DetectorOutput with given predictions: boxes [B, A, 4], scores [B, A, C] probabilities."""
    return DetectorOutput(torch.logit(scores.clamp(1e-4, 1 - 1e-4)), boxes, points, torch.full((len(points),), 8.0))


def line_of_points(n: int = 10) -> torch.Tensor:
    return torch.stack([torch.arange(n) * 8 + 4.0, torch.full((n,), 20.0)], dim=-1)  # [n, 2] on y = 20


def test_task_aligned_takes_the_topk_best_aligned_locations_inside_each_box():
    points = line_of_points()
    gt = torch.tensor([[[0.0, 0.0, 80.0, 40.0]]])  # covers all 10 points
    # Each location predicts the gt box shifted by its index: location 0 is perfect.
    boxes = torch.stack([gt[0, 0] + torch.tensor([i, 0, i, 0]) * 4.0 for i in range(10)])[None]
    assignment = TaskAlignedAssigner(topk=3)(outputs_for(points, boxes, torch.full((1, 10, 1), 0.5)), gt,
                                             torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    assert assignment.matched[0].tolist() == [0, 0, 0] + [-1] * 7
    # The best location's target is its IoU with the box; the others scale with their alignment.
    best_iou = paired_iou(boxes[0, 0], gt[0, 0])
    assert assignment.quality[0, 0] == pytest.approx(float(best_iou), abs=1e-5)
    assert assignment.quality[0, 0] > assignment.quality[0, 1] > assignment.quality[0, 2] > 0
    assert torch.all(assignment.quality[0, 3:] == 0)


def test_task_aligned_gives_a_shared_location_to_the_box_it_overlaps_most_and_skips_padding():
    points = line_of_points(4)
    gts = torch.tensor([[[0.0, 0.0, 32.0, 40.0], [0.0, 10.0, 20.0, 30.0], [0.0, 0.0, 0.0, 0.0]]])
    boxes = gts[0, 1].expand(1, 4, 4).clone()  # every location predicts box 1
    valid = torch.tensor([[True, True, False]])
    assignment = TaskAlignedAssigner(topk=4)(outputs_for(points, boxes, torch.full((1, 4, 1), 0.5)), gts,
                                             torch.zeros(1, 3, dtype=torch.long), valid)
    # Points 0 and 1 (x = 4, 12) lie in both boxes and go to box 1; 2 and 3 only in box 0.
    assert assignment.matched[0].tolist() == [1, 1, 0, 0]


def test_small_box_rule_gives_candidates_to_a_box_between_grid_points():
    points = line_of_points(4)  # x = 4, 12, 20, 28
    tiny = torch.tensor([[[5.0, 18.0, 11.0, 22.0]]])  # 6 px wide, between x = 4 and x = 12
    args = (torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    preds = outputs_for(points, tiny.expand(1, 4, 4).clone(), torch.full((1, 4, 1), 0.5))
    assert TaskAlignedAssigner(topk=4)(preds, tiny, *args).matched[0].tolist() == [-1] * 4
    with_rule = TaskAlignedAssigner(topk=4, small_box_side=16.0)(preds, tiny, *args).matched[0].tolist()
    assert with_rule == [0, 0, -1, -1]


def test_distribution_focal_loss_is_smallest_on_the_bracketing_bins():
    target = torch.tensor([[2.3, 0.0, 5.9, 14.99]])  # bins of a reg_max = 16 head
    logits = torch.zeros(1, 4, 16, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=5.0)
    for _ in range(300):
        opt.zero_grad()
        distribution_focal_loss(logits, target).sum().backward()
        opt.step()
    expectation = (logits.softmax(-1) * torch.arange(16.0)).sum(-1)
    torch.testing.assert_close(expectation, target.clamp(max=14.99), atol=0.05, rtol=0)
    # Probability mass sits on the two bins around the target.
    assert logits.softmax(-1)[0, 0, 2:4].sum() > 0.95


def test_ciou_is_iou_for_concentric_same_shape_boxes_and_lower_otherwise():
    a = torch.tensor([10.0, 10.0, 30.0, 50.0])
    same_shape = torch.tensor([5.0, 0.0, 35.0, 60.0])  # same centre and aspect ratio
    assert paired_ciou(a, same_shape) == pytest.approx(float(paired_iou(a, same_shape)), abs=1e-6)
    moved = a + torch.tensor([6.0, 0.0, 6.0, 0.0])
    squashed = torch.tensor([10.0, 20.0, 30.0, 40.0])
    assert paired_ciou(a, moved) < paired_iou(a, moved)
    assert paired_ciou(a, squashed) < paired_iou(a, squashed)


def test_ciou_gradients_stay_finite_on_degenerate_boxes():
    pred = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1e-6, 30.0]], requires_grad=True)
    gt = torch.tensor([[4.0, 4.0, 8.0, 8.0], [0.0, 0.0, 10.0, 30.0]])
    loss = (1 - paired_ciou(pred, gt)).sum()
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all() and pred.grad.abs().max() < 1e4


def test_warm_start_batchnorm_averages_its_first_batches_exactly():
    bn = WarmStartBatchNorm2d(2, eps=1e-3, momentum=0.03).train()
    batches = [torch.randn(4, 2, 3, 3) * 0.05 + i for i in range(5)]  # variance far from the initial 1
    for x in batches:
        bn(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    variances = torch.stack([x.var(dim=(0, 2, 3)) for x in batches])  # unbiased, as BatchNorm keeps them
    torch.testing.assert_close(bn.running_mean, means.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var, variances.mean(0), atol=1e-6, rtol=1e-4)
    assert int(bn.num_batches_tracked) == 5
    # Past 1 / momentum batches it is the usual moving average.
    for _ in range(40):
        bn(batches[0])
    previous = bn.running_mean.clone()
    bn(batches[4])
    torch.testing.assert_close(bn.running_mean, 0.97 * previous + 0.03 * batches[4].mean(dim=(0, 2, 3)))


def test_every_batchnorm_of_the_detector_warm_starts():
    model = build_model(ModelConfig(), num_classes=2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, WarmStartBatchNorm2d) for m in norms)


def test_nominal_batch_sets_the_micro_batches_per_step():
    def plan(tcfg: TrainConfig, world_size: int = 1):
        return plan_training(tcfg, 1000, world_size)

    assert plan(TrainConfig(batch_size=16, nominal_batch=64)).micro_batches == 4
    assert plan(TrainConfig(batch_size=24, nominal_batch=64)).micro_batches == 3  # round(2.67)
    assert plan(TrainConfig(batch_size=128, nominal_batch=64)).micro_batches == 1
    # With 2 processes the nominal batch counts images over both: half the accumulation.
    two = plan(TrainConfig(batch_size=16, nominal_batch=64), world_size=2)
    assert (two.micro_batches, two.global_batch, two.images_per_step, two.batches_per_epoch) == (2, 32, 64, 31)
    # 1000 images, batches of 16 x 2 processes: 31 full ones; drop_last off trains the 32nd (8 per process).
    kept = plan(TrainConfig(batch_size=16, nominal_batch=64, drop_last=False), world_size=2)
    assert (kept.batches_per_epoch, kept.steps_per_epoch, kept.epoch_images) == (32, 16, 1000)
    assert [kept.images_in_step(i) for i in (0, 14, 15)] == [64, 64, 40]
    assert [two.images_in_step(i) for i in (0, 14, 15)] == [64, 64, 32]  # 31 batches: the last step has one
    explicit = TrainConfig(batch_size=8, accumulate=3)  # a fixed accumulation turns the nominal batch off
    assert explicit.nominal_batch is None and plan(explicit).images_per_step == 24
    assert plan(TrainConfig.model_validate(explicit.model_dump())).images_per_step == 24  # as reloaded from the run
    with pytest.raises(DetpactError, match="train.accumulate or train.nominal_batch"):
        validate_config({"config_version": 1, "data": {"format": "synthetic"},
                         "train": {"accumulate": 2, "nominal_batch": 64}})


def test_close_mosaic_switches_mosaic_off_from_its_epoch():
    cfg = AugmentConfig(mosaic_p=1.0, close_mosaic_epochs=2)
    ds = DetectionDataset([], 64, train=True, augment=cfg, mosaic_until=8)
    assert ds.augment_at(7).mosaic_p == 1.0 and ds.augment_at(8).mosaic_p == 0.0 and ds.augment_at(9).mosaic_p == 0.0
    assert ds.augment_at(8).scale == cfg.scale  # only the mosaic goes
    assert DetectionDataset([], 64, train=True, augment=cfg).augment_at(math.inf).mosaic_p == 1.0


def test_multi_scale_sizes_are_a_pure_function_of_the_step_and_boxes_follow_the_pixels():
    scales = MultiScale(seed=0, image_size=320, fraction=0.5)
    sizes = [scales.size_at(step) for step in range(1, 200)]
    assert sizes == [MultiScale(0, 320, 0.5).size_at(step) for step in range(1, 200)]
    assert all(s % 32 == 0 and 160 <= s <= 480 for s in sizes) and len(set(sizes)) >= 8
    assert sizes != [MultiScale(1, 320, 0.5).size_at(step) for step in range(1, 200)]
    images = torch.zeros(1, 3, 64, 64)
    images[..., 16:32, 8:24] = 1.0  # a bright square where the box is
    resized, (target,) = rescale_batch(images, [{"boxes": torch.tensor([[8.0, 16.0, 24.0, 32.0]])}], 128)
    assert resized.shape == (1, 3, 128, 128)
    x1, y1, x2, y2 = target["boxes"][0].int().tolist()
    assert (x1, y1, x2, y2) == (16, 32, 48, 64) and resized[0, 0, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].min() > 0.99
