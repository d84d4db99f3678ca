"""The scenario settings file: the shipped default loads, rows expand per severity, and
every bad file is one DetpactError that names the file and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from detpact.errors import DetpactError
from detpact.robustness.corruptions import CORRUPTIONS
from detpact.robustness.settings import load_settings, scenario_rows
from detpact.robustness.subsets import SUBSETS

DEFAULT = Path(__file__).resolve().parents[2] / "configs" / "scenarios" / "default.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenarios.yaml"
    path.write_text(text)
    return path


def test_the_default_suite_is_every_corruption_at_1_3_5_and_the_generic_subsets():
    rows = scenario_rows(load_settings(DEFAULT))
    corrupted = [(r.corruption, r.severity) for r in rows if r.kind == "corruption"]
    assert corrupted == [(name, s) for name in CORRUPTIONS for s in (1, 3, 5)]
    assert [r.subset.subset for r in rows if r.kind == "subset"] == ["small_objects", "crowded", "truncated"]
    assert set(SUBSETS) - {"small_objects", "crowded", "truncated"} == {"classes"}  # dataset-specific: not default


def test_rows_expand_per_severity_and_subsets_fill_their_defaults(tmp_path):
    settings = load_settings(write(tmp_path, """
seed: 4
max_images: 10
scenarios:
  - {corruption: haze, severities: [5, 2]}
  - {name: noise, corruption: gaussian_noise}
  - {subset: small_objects}
  - {subset: truncated}
  - {name: few, subset: crowded, min_objects: 2}
  - {subset: classes, classes: [star]}
"""))
    assert (settings.seed, settings.max_images) == (4, 10)
    rows = scenario_rows(settings)
    assert [r.name for r in rows] == ["haze@2", "haze@5", "noise@1", "noise@3", "noise@5", "small_objects",
                                      "truncated", "few", "classes"]
    assert [r.subset.params() for r in rows[5:]] == [{"max_area": 1024.0}, {"margin": 1.0}, {"min_objects": 2},
                                                      {"classes": ["star"]}]


@pytest.mark.parametrize("text, message", [
    ("scenarios: [\n", "not valid YAML"),
    ("- corruption: blur\n", "must hold a mapping"),
    ("seed: 0\n", "scenarios: Field required"),
    ("scenarios: []\n", "scenarios: List should have at least 1 item"),
    ("scenarios:\n  - corruption: fog\n", "scenarios[0].corruption: Input should be 'gaussian_noise'"),
    ("scenarios:\n  - {corruption: blur, severities: [0, 3]}\n", "scenarios[0].severities: severities must be"),
    ("scenarios:\n  - {corruption: blur, severities: [3, 3]}\n", "distinct integers 1 to 5"),
    ("scenarios:\n  - {corruption: blur, severitys: [1]}\n", "scenarios[0].severitys: unknown key"),
    ("scenarios:\n  - {subset: crowded}\n", "scenarios[0]: subset crowded needs min_objects"),
    ("scenarios:\n  - {subset: truncated, min_objects: 3}\n", "subset truncated takes only margin, not min_objects"),
    ("scenarios:\n  - {subset: classes}\n", "subset classes needs classes"),
    ("scenarios:\n  - {subset: nearby}\n", "Input should be 'small_objects', 'crowded', 'truncated' or 'classes'"),
    ("scenarios:\n  - {severities: [1]}\n", "either a 'corruption' or a 'subset' key"),
    ("scenarios:\n  - {corruption: blur, subset: crowded}\n", "either a 'corruption' or a 'subset' key"),
    ("scenarios:\n  - corruption: blur\n  - corruption: blur\n", "blur appear(s) more than once"),
    ("scenarios:\n  - {name: clean, corruption: blur}\n", "not 'clean'"),
    ("scenarios:\n  - {name: a/b, corruption: blur}\n", "scenario name 'a/b'"),
    ("seed: -1\nscenarios:\n  - corruption: blur\n", "seed: Input should be greater than or equal to 0"),
])
def test_bad_settings_name_the_file_and_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DetpactError) as caught:
        load_settings(path)
    assert str(path) in caught.value.message
    assert message in caught.value.message


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DetpactError, match="not found: .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml")
