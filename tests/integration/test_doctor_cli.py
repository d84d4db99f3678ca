"""`detpact doctor` through the real entry point: it passes on this install, and with a
dependency made unimportable it names the package and the pip command, without the
rest of detpact (torch, ...) being imported first."""

from __future__ import annotations

import json
import os

from conftest import run_cli


def test_doctor_passes_here_and_names_a_broken_dependency(tmp_path, env):
    report = tmp_path / "doctor.json"
    ok = run_cli(["doctor", "--profile", "export", "--output-json", str(report)], env, tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    checks = json.loads(report.read_text())["checks"]
    assert {"torch build", "onnxruntime"} <= {c["name"] for c in checks} and all(c["status"] != "fail" for c in checks)

    broken = tmp_path / "broken"
    (broken / "onnxruntime").mkdir(parents=True)
    (broken / "onnxruntime" / "__init__.py").write_text("raise ImportError('libonnxruntime.so: cannot open')\n")
    path = os.pathsep.join(filter(None, [str(broken), env.get("PYTHONPATH")]))
    failed = run_cli(["doctor", "--profile", "export"], {**env, "PYTHONPATH": path}, tmp_path)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "onnxruntime" in failed.stdout and "pip install" in failed.stdout and "Traceback" not in failed.stderr
