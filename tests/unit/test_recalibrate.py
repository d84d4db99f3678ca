"""BatchNorm recalibration: exact statistics of the given batches, nothing else touched."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from detpact.data.dataset import make_loader
from detpact.engine.recalibrate import EpochSampler, recalibrate_batchnorm, recalibration_indices
from detpact.models.layers import WarmStartBatchNorm2d


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, list]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (4, 3, 8, 8), generator=gen, dtype=torch.uint8), []) for _ in range(n)]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), WarmStartBatchNorm2d(5, eps=1e-3, momentum=0.03), nn.SiLU(),
                         nn.Conv2d(5, 2, 1), nn.BatchNorm2d(2))


def test_statistics_are_the_exact_mean_over_the_batches():
    model = _model()
    batches = _batches(3)
    conv, bn = model[0], model[1]
    with torch.no_grad():
        acts = [conv(images.float() / 255) for images, _ in batches]
    expected_mean = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    expected_var = torch.stack([a.var(dim=(0, 2, 3), unbiased=True) for a in acts]).mean(0)
    for layer in (model[1], model[4]):
        layer.running_mean.fill_(7.0)  # stale statistics from training
        layer.running_var.fill_(9.0)
    recalibrate_batchnorm(model, batches, torch.device("cpu"), "none", False)
    torch.testing.assert_close(bn.running_mean, expected_mean)
    torch.testing.assert_close(bn.running_var, expected_var)
    assert not torch.equal(model[4].running_mean, torch.full((2,), 7.0))  # every layer, in one pass


def test_weights_momentum_counters_and_mode_are_kept():
    model = _model().train()
    with torch.no_grad():
        for images, _ in _batches(5, seed=1):  # 5 training batches: counters at 5
            model(images.float() / 255)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    recalibrate_batchnorm(model, _batches(2), torch.device("cpu"), "none", False)
    after = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(after[key], value), key  # num_batches_tracked included: the warm start goes on
    assert model[1].momentum == 0.03 and model[4].momentum == 0.1
    assert model.training and model[1].training
    model.eval()
    recalibrate_batchnorm(model, _batches(2), torch.device("cpu"), "none", False)
    assert not model.training and not model[1].training


def test_recalibration_is_deterministic():
    first, second = _model(), _model()
    for model in (first, second):
        recalibrate_batchnorm(model, _batches(2), torch.device("cpu"), "none", False)
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key


def test_indices_spread_over_the_split():
    assert recalibration_indices(5, 256) == [0, 1, 2, 3, 4]
    picked = recalibration_indices(1000, 4)
    assert picked == [0, 250, 500, 750]
    assert len(set(recalibration_indices(1001, 256))) == 256


class _Keys(Dataset):
    """Serves each sample's dataset key, to see what a loader asked for."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        return torch.tensor(key), {}


def test_epoch_sampler_asks_for_the_epoch_set():
    loader = make_loader(_Keys(), 2, 0, EpochSampler([1, 4, 7]))
    loader.sampler.epoch = 5
    keys = torch.cat([images for images, _ in loader]).tolist()
    assert keys == [[5, 1], [5, 4], [5, 7]]
    loader.sampler.epoch = 6  # the same images, the next epoch's augmentation
    assert [k[0] for k in torch.cat([images for images, _ in loader]).tolist()] == [6, 6, 6]
