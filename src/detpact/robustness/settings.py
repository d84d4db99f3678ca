"""The scenario settings file of `detpact test` (e.g. configs/scenarios/default.yaml).

```yaml
seed: 0            # corruption seed; each image's own seed is image_seed(seed, its path)
max_images: null   # only the first N images of the validation split
scenarios:
  - corruption: gaussian_noise      # one row per severity: gaussian_noise@1, @3, @5
    severities: [1, 3, 5]
  - subset: crowded                 # images with at least min_objects objects
    min_objects: 4
  - {name: circles, subset: classes, classes: [circle]}
```

A scenario is a corruption (with severities) or a subset (with the parameters its rule
takes; any other parameter is an error). `name` defaults to the corruption or subset name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from detpact.config.section import Section
from detpact.errors import DetpactError
from detpact.robustness.corruptions import CORRUPTIONS, SEVERITIES
from detpact.robustness.subsets import SMALL_AREA, SUBSETS

# Which parameters each subset rule takes (and nothing else may be set on it).
SUBSET_PARAMS = {"small_objects": ("max_area",), "crowded": ("min_objects",), "truncated": ("margin",),
                 "classes": ("classes",)}
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class CorruptionScenario(Section):
    name: str | None = None
    """the scenario's name in the table and JSON (default: the corruption); rows are `<name>@<severity>`"""
    corruption: Literal[CORRUPTIONS]  # type: ignore[valid-type]
    """gaussian_noise, blur, brightness, contrast, jpeg, haze or occlusion (robustness/corruptions.py)"""
    severities: list[int] = Field([1, 3, 5], min_length=1)
    """severities to score, each 1 (mild) to 5 (strongest)"""

    @field_validator("severities")
    @classmethod
    def _valid_severities(cls, value: list[int]) -> list[int]:
        if any(s not in SEVERITIES for s in value) or len(set(value)) != len(value):
            raise ValueError(f"severities must be distinct integers 1 to 5, got {value}")
        return sorted(value)

    @property
    def label(self) -> str:
        return self.name or self.corruption


class SubsetScenario(Section):
    name: str | None = None
    """the scenario's name in the table and JSON (default: the subset)"""
    subset: Literal[SUBSETS]  # type: ignore[valid-type]
    """small_objects, crowded, truncated or classes (robustness/subsets.py)"""
    max_area: float | None = Field(None, gt=0)
    """small_objects: an object is small below this box area in original pixels (default 32 x 32, COCO's)"""
    min_objects: int | None = Field(None, ge=1)
    """crowded: images with at least this many objects (required)"""
    margin: float | None = Field(None, ge=0)
    """truncated: a box edge within this many pixels of the image border (default 1)"""
    classes: list[str] | None = None
    """classes: images holding any of these class names (required)"""

    @model_validator(mode="after")
    def _params_of_the_rule(self) -> SubsetScenario:
        takes = SUBSET_PARAMS[self.subset]
        stray = [key for key in ("max_area", "min_objects", "margin", "classes")
                 if getattr(self, key) is not None and key not in takes]
        if stray:
            raise ValueError(f"subset {self.subset} takes only {', '.join(takes)}, not {', '.join(stray)}")
        if self.subset == "crowded" and self.min_objects is None:
            raise ValueError("subset crowded needs min_objects (images with at least that many objects)")
        if self.subset == "classes" and not self.classes:
            raise ValueError("subset classes needs classes: a list of class names")
        return self

    @property
    def label(self) -> str:
        return self.name or self.subset

    def params(self) -> dict[str, Any]:
        """The rule's parameters with their defaults filled in (as the report records them)."""
        defaults = {"max_area": SMALL_AREA, "margin": 1.0}
        return {key: getattr(self, key) if getattr(self, key) is not None else defaults.get(key)
                for key in SUBSET_PARAMS[self.subset]}


def _kind(value: Any) -> str | None:
    """Which scenario model an entry is: by its `corruption` or `subset` key."""
    keys = value if isinstance(value, dict) else vars(value) if hasattr(value, "__dict__") else {}
    if "corruption" in keys and "subset" not in keys:
        return "corruption"
    if "subset" in keys and "corruption" not in keys:
        return "subset"
    return None


Scenario = Annotated[
    Annotated[CorruptionScenario, Tag("corruption")] | Annotated[SubsetScenario, Tag("subset")],
    Discriminator(_kind, custom_error_type="scenario_kind",
                  custom_error_message="a scenario has either a 'corruption' or a 'subset' key (not both)"),
]


class ScenarioSettings(Section):
    seed: int = Field(0, ge=0)
    """the corruption seed: image i is corrupted with image_seed(seed, its dataset-relative path)"""
    max_images: int | None = Field(None, ge=1)
    """only the first N images of the validation split (null: all of it)"""
    scenarios: list[Scenario] = Field(min_length=1)
    """the scenarios, scored in this order after the clean split"""

    @model_validator(mode="after")
    def _distinct_names(self) -> ScenarioSettings:
        labels = [s.label for s in self.scenarios]
        for label in labels:
            if not set(label) <= NAME_CHARS or label == "clean":
                raise ValueError(f"scenario name {label!r}: use letters, digits, '_', '-', '.', and not 'clean'")
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise ValueError(f"scenario names must differ: {', '.join(repeated)} appear(s) more than once; set 'name' to tell them apart")
        return self


@dataclass(frozen=True)
class ScenarioRow:
    """One row of the suite: a corruption at one severity, or a subset."""

    name: str
    kind: Literal["corruption", "subset"]
    corruption: str | None = None
    severity: int | None = None
    subset: SubsetScenario | None = None


def scenario_rows(settings: ScenarioSettings) -> list[ScenarioRow]:
    """The rows the suite scores, in the file's order, corruptions expanded per severity."""
    rows = []
    for scenario in settings.scenarios:
        if isinstance(scenario, CorruptionScenario):
            rows += [ScenarioRow(f"{scenario.label}@{s}", "corruption", scenario.corruption, s)
                     for s in scenario.severities]
        else:
            rows.append(ScenarioRow(scenario.label, "subset", subset=scenario))
    return rows


def load_settings(path: str | Path) -> ScenarioSettings:
    """Read and validate a scenario settings file; every problem names the file."""
    path = Path(path)
    if not path.is_file():
        raise DetpactError(f"Scenario settings file not found: {path}. Pass a YAML file such as "
                           "configs/scenarios/default.yaml.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DetpactError(f"Scenario settings file {path} is not valid YAML: {exc}. Fix the syntax.") from None
    except UnicodeDecodeError:
        raise DetpactError(f"Scenario settings file {path} is not UTF-8 text. Save it as UTF-8 YAML.") from None
    if not isinstance(raw, dict):
        raise DetpactError(f"Scenario settings file {path} must hold a mapping with a 'scenarios' list, not "
                           f"{type(raw).__name__}. See configs/scenarios/default.yaml.")
    try:
        return ScenarioSettings.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise DetpactError(f"Invalid scenario settings {path}:\n{problems}\n"
                           "Fix the file (see docs/robustness.md for the format) and run again.") from None


def _describe(err: dict[str, Any]) -> str:
    # The location without the union's tag: scenarios[2].severities, not scenarios.2.corruption.severities.
    parts = list(err["loc"])
    if parts[:1] == ["scenarios"] and len(parts) > 2 and parts[2] in ("corruption", "subset"):
        del parts[2]
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".") or "<top level>"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" + (f" (got {err['input']!r})" if err["type"] not in (
        "extra_forbidden", "missing", "value_error", "scenario_kind") else "")
