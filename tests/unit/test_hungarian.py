"""Hungarian matching and the rtdetr set criterion, on hand-built predictions."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from detpact.config import HeadConfig, MatcherConfig, RTDETRConfig, SetLossConfig
from detpact.models.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from detpact.models.losses import SetCriterion, build_criterion
from detpact.models.matching import HungarianMatcher
from detpact.models.outputs import DenoisingGroups, DetrOutput, QueryPrediction

CFG = MatcherConfig()
IMAGE_SIZE = (64, 96)  # (H, W)
NUM_CLASSES = 3


def random_cxcywh(n: int, gen: torch.Generator) -> torch.Tensor:
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
    size = 0.05 + 0.35 * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, size], dim=1)


def random_targets(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen), "boxes": random_cxcywh(n, gen)}


def pair_cost(logits: torch.Tensor, box: torch.Tensor, label: int, gt_box: torch.Tensor, cfg: MatcherConfig) -> float:
    """The matching cost of one query with one box, written out scalar by scalar."""
    p = float(torch.sigmoid(logits[label]))
    focal = (cfg.alpha * (1 - p) ** cfg.gamma * -math.log(p + 1e-8)
             - (1 - cfg.alpha) * p ** cfg.gamma * -math.log(1 - p + 1e-8))
    l1 = float((box - gt_box).abs().sum())
    ax1, ay1, ax2, ay2 = box_cxcywh_to_xyxy(box).tolist()
    bx1, by1, bx2, by2 = box_cxcywh_to_xyxy(gt_box).tolist()
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    enclosing = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    giou = inter / union - (enclosing - union) / enclosing
    return cfg.cost_class * focal + cfg.cost_bbox * l1 - cfg.cost_giou * giou


def brute_force(cost: list[list[float]]) -> set[tuple[int, int]]:
    """The (query, target) pairs of the cheapest one-to-one matching of min(Q, N) pairs."""
    num_queries, num_targets = len(cost), len(cost[0])
    if num_targets <= num_queries:  # every target gets a distinct query
        best = min(itertools.permutations(range(num_queries), num_targets),
                   key=lambda qs: sum(cost[q][t] for t, q in enumerate(qs)))
        return {(q, t) for t, q in enumerate(best)}
    best = min(itertools.permutations(range(num_targets), num_queries),  # every query gets a distinct target
               key=lambda ts: sum(cost[q][t] for q, t in enumerate(ts)))
    return {(q, t) for q, t in enumerate(best)}


def as_pairs(indices: tuple[torch.Tensor, torch.Tensor]) -> set[tuple[int, int]]:
    return set(zip(indices[0].tolist(), indices[1].tolist()))


# ---------------------------------------------------------------- matcher


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_queries,num_targets", [(1, 1), (3, 2), (4, 4), (6, 3), (5, 1), (2, 4), (3, 4)])
def test_matcher_finds_the_cheapest_assignment(seed, num_queries, num_targets):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, num_queries, NUM_CLASSES, generator=gen) * 2
    boxes = random_cxcywh(num_queries, gen)[None]
    target = random_targets(num_targets, gen)
    (query_idx, target_idx), = HungarianMatcher(CFG)(logits, boxes, [target])

    assert query_idx.dtype == target_idx.dtype == torch.int64
    assert len(query_idx) == len(target_idx) == min(num_queries, num_targets)
    cost = [[pair_cost(logits[0, q], boxes[0, q], int(target["labels"][t]), target["boxes"][t], CFG)
             for t in range(num_targets)] for q in range(num_queries)]
    assert as_pairs((query_idx, target_idx)) == brute_force(cost)


def test_batched_matching_equals_per_image_matching():
    gen = torch.Generator().manual_seed(0)
    sizes = [3, 0, 7, 1, 5]  # 7 > Q: only Q of that image's boxes get a query
    num_queries = 6
    logits = torch.randn(len(sizes), num_queries, NUM_CLASSES, generator=gen)
    boxes = torch.stack([random_cxcywh(num_queries, gen) for _ in sizes])
    targets = [random_targets(n, gen) for n in sizes]
    matcher = HungarianMatcher(CFG)

    batched = matcher(logits, boxes, targets)
    assert len(batched) == len(sizes)
    for i, n in enumerate(sizes):
        (single,) = matcher(logits[i:i + 1], boxes[i:i + 1], [targets[i]])
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
        assert len(batched[i][0]) == min(num_queries, n)
    assert matcher(logits, boxes, targets)[2][1].tolist() == batched[2][1].tolist()  # deterministic


def test_matching_without_targets_gives_empty_indices():
    gen = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(2, 4, NUM_CLASSES), torch.stack([random_cxcywh(4, gen) for _ in range(2)])
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for query_idx, target_idx in HungarianMatcher(CFG)(logits, boxes, [empty, empty]):
        assert query_idx.shape == target_idx.shape == (0,) and query_idx.dtype == torch.int64


def test_matching_survives_non_finite_predictions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 5, NUM_CLASSES, generator=gen)
    boxes = random_cxcywh(5, gen)[None]
    boxes[0, 1] = float("nan")
    logits[0, 3] = float("inf")
    (query_idx, target_idx), = HungarianMatcher(CFG)(logits, boxes, [random_targets(2, gen)])
    assert len(query_idx) == 2
    assert 1 not in query_idx.tolist()  # the NaN box is everyone's last choice


# ---------------------------------------------------------------- criterion


def pixel_targets(sizes: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Targets as the training loop passes them: xyxy pixel boxes."""
    gen = torch.Generator().manual_seed(seed)
    height, width = IMAGE_SIZE
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
             "boxes": box_cxcywh_to_xyxy(random_cxcywh(n, gen)) * scale} for n in sizes]


def normalised(target: dict[str, torch.Tensor]) -> torch.Tensor:
    height, width = IMAGE_SIZE
    return box_xyxy_to_cxcywh(target["boxes"]) / torch.tensor([width, height, width, height])


def prediction(batch: int, num_queries: int, seed: int, dtype: torch.dtype = torch.float32) -> QueryPrediction:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_queries, NUM_CLASSES, generator=gen).to(dtype).requires_grad_()
    boxes = torch.stack([random_cxcywh(num_queries, gen) for _ in range(batch)]).to(dtype).requires_grad_()
    return QueryPrediction(logits, boxes)


def perfect_prediction(targets: list[dict[str, torch.Tensor]], num_queries: int) -> QueryPrediction:
    """Queries 0..N_i-1 sit exactly on image i's boxes, sure of their class; the rest say nothing."""
    gen = torch.Generator().manual_seed(9)
    logits = torch.full((len(targets), num_queries, NUM_CLASSES), -12.0)
    boxes = torch.stack([random_cxcywh(num_queries, gen) for _ in targets])
    for i, target in enumerate(targets):
        n = len(target["labels"])
        boxes[i, :n] = normalised(target)
        logits[i, torch.arange(n), target["labels"]] = 12.0
    return QueryPrediction(logits.requires_grad_(), boxes.requires_grad_())


def detr_output(layers: list[QueryPrediction], encoder: QueryPrediction | None = None,
                denoising: list[QueryPrediction] | None = None, dn_groups: DenoisingGroups | None = None) -> DetrOutput:
    height, width = IMAGE_SIZE
    last = layers[-1]
    pixels = box_cxcywh_to_xyxy(last.boxes.detach()) * torch.tensor([width, height, width, height])
    return DetrOutput(last.logits, pixels, IMAGE_SIZE, layers, encoder, denoising, dn_groups)


def denoising_groups(sizes: list[int], num_groups: int) -> DenoisingGroups:
    """Positive copies first in each group of 2 * max_gt queries, as the head lays them out."""
    group = 2 * max(sizes)
    positive = [torch.cat([g * group + torch.arange(n) for g in range(num_groups)]) for n in sizes]
    target = [torch.arange(n).repeat(num_groups) for n in sizes]
    return DenoisingGroups(num_groups * group, num_groups, positive, target)


def set_criterion(loss: SetLossConfig | None = None) -> SetCriterion:
    criterion = build_criterion(HeadConfig(name="rtdetr", rtdetr=RTDETRConfig(loss=loss or SetLossConfig())))
    assert isinstance(criterion, SetCriterion)
    return criterion


SIZES = [2, 0, 4]
NUM_QUERIES = 6


def test_perfect_predictions_cost_almost_nothing():
    targets = pixel_targets(SIZES)
    criterion = set_criterion()
    perfect = criterion(detr_output([perfect_prediction(targets, NUM_QUERIES)]), targets)
    random = criterion(detr_output([prediction(len(SIZES), NUM_QUERIES, seed=1)]), targets)
    assert perfect["loss_l1"] < 1e-6 and perfect["loss_giou"] < 1e-5
    assert perfect["loss_vfl"] < 1e-3
    assert perfect["num_pos"] == sum(SIZES)
    assert perfect["loss"] < 0.01 * random["loss"]


def test_components_add_up_with_the_configured_weights():
    targets = pixel_targets(SIZES)
    weights = SetLossConfig(vfl_weight=0.7, l1_weight=3.0, giou_weight=1.5)
    out = detr_output([prediction(3, NUM_QUERIES, seed=s) for s in range(3)], encoder=prediction(3, NUM_QUERIES, 7))
    losses = set_criterion(weights)(out, targets)
    expected = 0.7 * losses["loss_vfl"] + 3.0 * losses["loss_l1"] + 1.5 * losses["loss_giou"]
    torch.testing.assert_close(losses["loss"].detach(), expected)
    assert all(not losses[k].requires_grad for k in ("loss_vfl", "loss_l1", "loss_giou", "num_pos"))


def test_one_layer_matches_rtdetr_formulas():
    """The criterion of one set against a direct transcription of RT-DETR's loss_labels_vfl / loss_boxes."""
    targets = pixel_targets(SIZES)
    pred = prediction(3, NUM_QUERIES, seed=3)
    criterion = set_criterion()
    losses = criterion(detr_output([pred]), targets)

    norm_targets = [{"labels": t["labels"], "boxes": normalised(t)} for t in targets]
    indices = criterion.matcher(pred.logits, pred.boxes, norm_targets)
    logits, num_boxes, cfg = pred.logits.detach(), sum(SIZES), SetLossConfig()
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
    query_idx = torch.cat([q for q, _ in indices])
    src = pred.boxes.detach()[batch_idx, query_idx]
    tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(norm_targets, indices)])
    classes = torch.full(logits.shape[:2], NUM_CLASSES, dtype=torch.int64)
    classes[batch_idx, query_idx] = torch.cat([t["labels"][j] for t, (_, j) in zip(norm_targets, indices)])
    onehot = F.one_hot(classes, NUM_CLASSES + 1)[..., :-1].float()
    a, b = box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    union = (a[:, 2:] - a[:, :2]).prod(-1) + (b[:, 2:] - b[:, :2]).prod(-1) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(-1)
    score = torch.zeros(logits.shape[:2])
    score[batch_idx, query_idx] = inter / union
    score = score[..., None] * onehot
    weight = cfg.alpha * logits.sigmoid().pow(cfg.gamma) * (1 - onehot) + score
    vfl = F.binary_cross_entropy_with_logits(logits, score, weight=weight, reduction="none")
    torch.testing.assert_close(losses["loss_vfl"], vfl.mean(1).sum() * NUM_QUERIES / num_boxes)
    torch.testing.assert_close(losses["loss_l1"], (src - tgt).abs().sum() / num_boxes)
    giou = inter / union - (hull - union) / hull
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / num_boxes)


def test_gradients_reach_every_prediction_set():
    targets = pixel_targets(SIZES)
    layers = [prediction(3, NUM_QUERIES, seed=s) for s in range(3)]
    encoder = prediction(3, NUM_QUERIES, seed=5)
    groups = denoising_groups(SIZES, num_groups=2)
    denoising = [prediction(3, groups.num_queries, seed=10 + s) for s in range(3)]
    set_criterion()(detr_output(layers, encoder, denoising, groups), targets)["loss"].backward()
    for pred in [*layers, encoder, *denoising]:
        assert pred.logits.grad is not None and pred.logits.grad.abs().sum() > 0
        assert pred.boxes.grad is not None and pred.boxes.grad.abs().sum() > 0


def test_denoising_sets_are_counted_with_their_fixed_pairs():
    targets = pixel_targets(SIZES)
    layers = [prediction(3, NUM_QUERIES, seed=s) for s in range(2)]
    groups = denoising_groups(SIZES, num_groups=3)
    denoising = [prediction(3, groups.num_queries, seed=20 + s) for s in range(2)]
    criterion = set_criterion()
    without = criterion(detr_output(layers), targets)
    with_dn = criterion(detr_output(layers, denoising=denoising, dn_groups=groups), targets)

    norm_targets = [{"labels": t["labels"], "boxes": normalised(t)} for t in targets]
    pairs = list(zip(groups.positive_idx, groups.target_idx))
    for key in ("loss_vfl", "loss_l1", "loss_giou"):
        dn = sum(criterion.set_losses(p.logits.float(), p.boxes.float(), norm_targets, pairs, sum(SIZES) * 3)[key]
                 for p in denoising)
        torch.testing.assert_close(with_dn[key], without[key] + dn.detach())
    assert with_dn["num_pos"] == without["num_pos"] == sum(SIZES)


def test_batches_without_boxes_give_a_finite_loss():
    targets = pixel_targets([0, 0])
    layers = [prediction(2, NUM_QUERIES, seed=s) for s in range(2)]
    losses = set_criterion()(detr_output(layers, encoder=prediction(2, NUM_QUERIES, seed=4)), targets)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0  # every query is a negative
    assert losses["loss_l1"] == 0 and losses["loss_giou"] == 0 and losses["num_pos"] == 0
    losses["loss"].backward()
    assert layers[0].logits.grad.abs().sum() > 0


def test_bf16_outputs_are_computed_in_float32():
    targets = pixel_targets(SIZES)
    half = prediction(3, NUM_QUERIES, seed=2, dtype=torch.bfloat16)
    full = QueryPrediction(half.logits.detach().float().requires_grad_(), half.boxes.detach().float().requires_grad_())
    criterion = set_criterion()
    losses_half = criterion(detr_output([half]), targets)
    losses_full = criterion(detr_output([full]), targets)
    assert losses_half["loss"].dtype == torch.float32
    torch.testing.assert_close(losses_half["loss"], losses_full["loss"])
    losses_half["loss"].backward()
    assert half.logits.grad.dtype == torch.bfloat16 and torch.isfinite(half.boxes.grad.float()).all()


def test_dense_head_still_gets_the_dense_criterion():
    assert type(build_criterion(HeadConfig())).__name__ == "DetectionCriterion"
    assert type(build_criterion(HeadConfig(), num_classes=3)).__name__ == "DetectionCriterion"
