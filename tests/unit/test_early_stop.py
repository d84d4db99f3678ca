"""Early stopping stops at the right validation, and its state round-trips."""

from __future__ import annotations

from detpact.config import EarlyStopConfig
from detpact.engine.early_stop import EarlyStopping


def run(values: list[float | None], **cfg) -> list[bool]:
    early = EarlyStopping(EarlyStopConfig(**cfg))
    return [early.update({"map50_95": v, "map50": v}) for v in values]


def test_stops_after_patience_validations_without_an_improvement_above_min_delta():
    # 0.105 does not beat 0.1 by more than 0.01 (stale 1); 0.2 does (stale 0); then 0.2, 0.205: stale 1, 2.
    assert run([0.1, 0.105, 0.2, 0.2, 0.205], patience=2, min_delta=0.01) == [False, False, False, False, True]
    assert run([0.1, 0.105, 0.2, 0.2, 0.205], patience=2) == [False] * 5  # min_delta 0: every rise counts
    assert run([0.3, 0.2, 0.1], patience=1) == [False, True, True]
    assert run([None, None], patience=1) == [False, True]  # no ground truth: never improves
    assert run([0.1, 0.0, 0.0, 0.0]) == [False] * 4  # patience None: off


def test_metric_choice_and_state_round_trip():
    early = EarlyStopping(EarlyStopConfig(patience=2, metric="map50"))
    early.update({"map50_95": 0.9, "map50": 0.5})
    early.update({"map50_95": 0.1, "map50": 0.4})
    resumed = EarlyStopping(EarlyStopConfig(patience=2, metric="map50"))
    resumed.load_state_dict(early.state_dict())
    assert resumed.state_dict() == {"best": 0.5, "stale": 1, "stopped": False}
    assert resumed.update({"map50_95": 0.95, "map50": 0.45}) and resumed.stopped


def test_best_follows_its_metric_and_mode():
    from detpact.engine.state import Best

    highest, lowest = Best("map50", "max"), Best("ar10", "min")
    assert highest.improved_by(None) and lowest.improved_by(0.5)  # the first validation always writes best.pt
    for best in (highest, lowest):
        best.value, best.step = (None if best is highest else 0.5), 1
    assert highest.improved_by(0.1) and not highest.improved_by(None)  # a defined value beats an undefined one
    highest.value = 0.1
    assert highest.improved_by(0.2) and not highest.improved_by(0.1) and not highest.improved_by(0.05)
    assert lowest.improved_by(0.4) and not lowest.improved_by(0.5) and not lowest.improved_by(0.6)


def test_the_run_metric_names_are_the_evaluators():
    import typing

    from detpact.config.train import ValMetric
    from detpact.evaluation.coco import HEADLINE_KEYS

    assert typing.get_args(ValMetric) == HEADLINE_KEYS
