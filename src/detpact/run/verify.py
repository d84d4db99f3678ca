"""`detpact runs verify`: checks that a run folder is what its records say it is.

Each check yields a `Check` row (pass / warn / fail, with the file it is about).
This module holds the checks that need only the run folder: artifacts against
manifest.json, and the config hash in config_resolved.yaml, run_meta.json and the
checkpoints. The API adds the ones that need the data (fingerprint, re-evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from detpact.config import config_hash, load_config
from detpact.errors import DetpactError
from detpact.run.atomic import read_json, stale_temp_files
from detpact.run.checkpoint import CORRUPT_SUFFIX, load_checkpoint
from detpact.run.contract import RunDir, file_entry, read_manifest

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str = ""


def check_manifest(run: RunDir) -> list[Check]:
    """Every artifact against its recorded sha256 and size; artifacts the manifest lacks fail."""
    manifest = read_manifest(run)
    if manifest is None:
        return [Check("manifest.json", "fail", f"{run.manifest} is missing or unreadable: nothing can be verified")]
    checks = []
    for name, recorded in manifest.items():
        path = run.root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(recorded, dict):
            checks.append(Check(name, "fail", "not a file entry of this run folder: manifest.json was altered"))
            continue
        if not path.is_file():
            checks.append(Check(name, "fail", "missing (recorded in manifest.json)"))
            continue
        actual = file_entry(path)
        if actual["sha256"] != recorded.get("sha256"):
            checks.append(Check(name, "fail", f"sha256 differs from manifest.json (size {actual['size']}, recorded "
                                              f"{recorded.get('size')}): altered after it was written"))
        else:
            checks.append(Check(name, "pass", f"sha256 {actual['sha256'][:12]}, {actual['size']} bytes"))
    for path in run.artifacts():
        if path.relative_to(run.root).as_posix() not in manifest:
            checks.append(Check(path.relative_to(run.root).as_posix(), "fail", "not recorded in manifest.json"))
    leftovers = stale_temp_files(run.checkpoints) + sorted(run.checkpoints.glob(f"*{CORRUPT_SUFFIX}"))
    for path in leftovers:
        checks.append(Check(path.relative_to(run.root).as_posix(), "warn",
                            "left by an interrupted write or set aside as damaged; not part of the run"))
    return checks


def check_config_hashes(run: RunDir, verified: set[str]) -> list[Check]:
    """config_resolved.yaml hashes to the config_hash of run_meta.json and of each checkpoint
    (only checkpoints named in `verified`, i.e. whose sha256 matched, are opened)."""
    try:
        expected = config_hash(load_config(run.config_resolved))
    except DetpactError as exc:
        return [Check("config hash", "fail", exc.message)]
    meta = read_json(run.run_meta) or {}
    # Hashes a resume with --allow-drift left behind: checkpoints written before it carry them.
    drifted = {r["allowed_drift"]["config"]["config_hash_before"] for r in meta.get("resumes", [])
               if "config" in r.get("allowed_drift", {})}
    checks = [_hash_check("reports/run_meta.json", meta.get("config_hash"), expected)]
    for path in (run.last_ckpt, run.prev_ckpt, run.best_ckpt):
        name = path.relative_to(run.root).as_posix()
        if not path.is_file():
            continue
        if name not in verified:
            checks.append(Check(f"config hash in {name}", "fail", "not checked: the file failed its checksum"))
            continue
        try:
            recorded = load_checkpoint(path)["config_hash"]
        except DetpactError as exc:
            checks.append(Check(f"config hash in {name}", "fail", exc.message))
            continue
        if recorded != expected and recorded in drifted:
            checks.append(Check(f"config hash in {name}", "warn", f"{recorded[:12]}: written under the config "
                                "before a resume with --allow-drift (see run_meta.json resumes)"))
        else:
            checks.append(_hash_check(name, recorded, expected))
    return checks


def check_parity_report(run: RunDir) -> list[Check]:
    """The verdict of reports/onnx_parity.json, when the run has one: a failed gate fails
    verify under `export.parity_policy: fail` and warns under `warn`."""
    report = read_json(run.onnx_parity)
    if report is None:
        return []
    name = "ONNX parity"
    if report.get("verdict") == "pass":
        return [Check(name, "pass", f"pass on {report.get('num_images')} images ({report.get('onnx')})")]
    from detpact.export.parity import describe_failure  # onnx and onnxruntime: only for a failed verdict

    status: Status = "warn" if report.get("policy") == "warn" else "fail"
    return [Check(name, status, f"{report.get('verdict')} under policy {report.get('policy')!r}: "
                                f"{describe_failure(report)}")]


def _hash_check(name: str, recorded: str | None, expected: str) -> Check:
    if recorded == expected:
        return Check(f"config hash in {name}", "pass", f"{expected[:12]} = config_resolved.yaml")
    return Check(f"config hash in {name}", "fail",
                 f"{str(recorded)[:12]} differs from config_resolved.yaml ({expected[:12]})")
