"""`detpact doctor`: passes on this venv, and each kind of broken environment fails with
the check that names the problem and the fix (a missing or out-of-range package, an
unwritable folder, a full disk); the supported ranges come from the packaging."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from detpact.commands import doctor
from detpact.errors import DetpactError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    doctor.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["doctor", *argv])


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Cache and output folders of the test's own, in os.environ (for run()) and as a mapping."""
    folders = {"DETPACT_CACHE_DIR": str(tmp_path / "cache"), "DETPACT_OUTPUT_DIR": str(tmp_path / "runs")}
    (tmp_path / "cache").mkdir()
    for key, value in folders.items():
        monkeypatch.setenv(key, value)
    return {**os.environ, **folders}


def by_name(checks: list[doctor.DoctorCheck]) -> dict[str, doctor.DoctorCheck]:
    return {c.name: c for c in checks}


def declared() -> dict[str, doctor.Requirement]:
    return doctor.parse_requirements(importlib.metadata.requires("detpact") or [])


@pytest.mark.parametrize("profile", ["core", "export"])
def test_passes_on_this_venv_and_writes_the_report(profile, env, tmp_path, capsys):
    out = tmp_path / "reports" / "doctor.json"
    assert doctor.run(parse("--profile", profile, "--output-json", str(out))) == 0
    assert "doctor: PASS" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["profile"] == profile and report["passed"] is True
    assert {"python", "platform", "detpact_version"} <= report.keys()
    assert all(c["status"] in ("pass", "warn") for c in report["checks"])
    names = {c["name"] for c in report["checks"]}
    assert {"torch build", "threads", "cache folder", "cache folder disk", "output root", "output root disk"} <= names
    assert {"onnx", "onnxscript", "onnxruntime", "onnxruntime providers"} <= names
    if profile == "core":  # every base dependency of the packaging is checked
        assert {name for name, r in declared().items() if r.extra is None} <= names
    assert "CPUExecutionProvider" in by_name([doctor.DoctorCheck(**c) for c in report["checks"]])[
        "onnxruntime providers"].detail


def test_an_unimportable_package_fails_with_the_pip_command(env, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importlib raises ImportError for a None entry
    check = by_name(doctor.run_doctor("export", env))["onnxruntime"]
    assert check.status == "fail" and "not importable" in check.detail
    req = declared()["onnxruntime"]
    assert "pip install" in check.fix
    assert f"detpact[{req.extra}]" in check.fix if req.extra else f"'onnxruntime{req.specifier}'" in check.fix
    assert doctor.run(parse("--profile", "export")) == 1
    out = capsys.readouterr().out
    assert "doctor: FAIL (1 failed: onnxruntime)" in out and check.fix in out


def test_an_out_of_range_version_fails_with_the_range(env, monkeypatch):
    real = importlib.metadata.version
    fake = {"numpy": "1.20.0", "torch": "2.9.1+cpu"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name) or real(name))
    checks = by_name(doctor.run_doctor("core", env))
    numpy, torch = checks["numpy"], checks["torch"]
    assert numpy.status == "fail" and "1.20.0" in numpy.detail and declared()["numpy"].specifier in numpy.detail
    assert numpy.fix == f"pip install 'numpy{declared()['numpy'].specifier}'"
    assert torch.status == "fail" and doctor.TORCH_PIN in torch.fix and "CPU wheel" in torch.fix
    assert checks["pillow"].status == "pass"


def test_ranges_and_extras_come_from_the_requirement_lines():
    lines = ['torch<2.14,>=2.10', 'onnxruntime<2,>=1.20; extra == "export"', 'pytest<10,>=8; extra == "test"',
             'Foo_Bar[cli]>=1.0; extra == "adapt" and python_version >= "3.11"']
    reqs = doctor.parse_requirements(lines)
    assert reqs["onnxruntime"] == doctor.Requirement("onnxruntime", ">=1.20,<2", "export")
    assert reqs["foo-bar"] == doctor.Requirement("foo-bar", ">=1.0", "adapt")
    assert doctor.install_command(reqs["onnxruntime"]) == "pip install 'detpact[export]'"
    assert [r.name for r in doctor.profile_requirements("core", reqs)] == ["torch"]
    export = doctor.profile_requirements("export", reqs)
    assert [(r.name, r.listed) for r in export] == [("onnx", False), ("onnxscript", False), ("onnxruntime", True)]
    everything = {r.name for r in doctor.profile_requirements("all", reqs)}
    assert {"torch", "onnxruntime", "foo-bar", "tensorboard", "mlflow", "torchao"} <= everything
    assert "pytest" not in everything  # the test extra is for developers, not a profile
    assert doctor.in_range("2.13.0+cpu", ">=2.10,<2.14") and not doctor.in_range("2.14.0", ">=2.10,<2.14")


def test_a_package_no_extra_lists_is_a_warning_with_the_pip_command():
    check = doctor.dependency_check(doctor.Requirement("detpact-no-such-package", listed=False))
    assert check.status == "warn" and "pip install detpact-no-such-package" in check.detail
    listed = doctor.dependency_check(doctor.Requirement("detpact-no-such-package", ">=1", "tracking"))
    assert listed.status == "fail" and listed.fix == "pip install 'detpact[tracking]'"


def test_an_unwritable_cache_folder_fails_with_the_fix(env, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a 0o500 folder stays writable")
        check = by_name(doctor.run_doctor("core", {**env, "DETPACT_CACHE_DIR": str(locked)}))["cache folder"]
        assert check.status == "fail" and str(locked) in check.detail and "DETPACT_CACHE_DIR" in check.fix
    finally:
        locked.chmod(0o700)


def test_a_refused_write_fails_with_the_fix(env, monkeypatch):
    """The branch the 0o500 test reaches, reached as root too: the probe file is refused."""
    def refuse(**kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(doctor.tempfile, "NamedTemporaryFile", refuse)
    check = by_name(doctor.run_doctor("core", env))["cache folder"]
    assert check.status == "fail" and "Permission denied" in check.detail
    assert f"chmod u+w {env['DETPACT_CACHE_DIR']}" in check.fix and "DETPACT_CACHE_DIR" in check.fix


def test_a_cache_folder_under_a_file_fails_even_as_root(env, tmp_path):
    (tmp_path / "file").write_text("")
    checks = by_name(doctor.run_doctor("core", {**env, "DETPACT_CACHE_DIR": str(tmp_path / "file" / "cache")}))
    assert checks["cache folder"].status == "fail" and "not a folder" in checks["cache folder"].detail
    assert "DETPACT_CACHE_DIR" in checks["cache folder"].fix
    assert checks["output root"].status == "pass" and "not yet created" in checks["output root"].detail


@pytest.mark.parametrize(("free", "status"), [(100 * 1024**2, "fail"), (1024**3, "warn"), (3 * 1024**3, "pass")])
def test_free_disk_thresholds(env, monkeypatch, free, status):
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    checks = by_name(doctor.folder_checks("cache folder", Path(env["DETPACT_CACHE_DIR"]), "DETPACT_CACHE_DIR"))
    assert checks["cache folder disk"].status == status
    assert ("DETPACT_CACHE_DIR" in checks["cache folder disk"].fix) == (status != "pass")


def test_more_torch_threads_than_cores_is_a_warning(env, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = by_name(doctor.torch_checks(set(), env))["threads"]
    assert threads.status == "warn" and "8 threads" in threads.detail and threads.fix == "export OMP_NUM_THREADS=2"


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        parse("--profile", "nope")
    assert exit_info.value.code == 2
    with pytest.raises(DetpactError) as error:
        doctor.run(parse("--output-json", str(tmp_path)))
    assert error.value.exit_code == 2
    with pytest.raises(DetpactError, match="core"):
        doctor.run_doctor("nope", {})
