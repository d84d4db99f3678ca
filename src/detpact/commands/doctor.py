"""`detpact doctor`: can this environment run detpact? Dependencies against the ranges the
packaging declares, the torch build, thread settings, and the cache and output folders.

Every check is a DoctorCheck (pass | warn | fail, with the fix for a failure). The
supported ranges are read at runtime from detpact's installed metadata
(importlib.metadata.requires), so doctor stays true to pyproject.toml.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from detpact import __version__
from detpact.errors import DetpactError
from detpact.run.atomic import atomic_write_json
from detpact.run.contract import resolve_cache_dir, resolve_output_root

Status = Literal["pass", "warn", "fail"]
PROFILES = ("core", "export", "tracking", "adapt", "all")
# The packages of each optional profile; "core" is the base dependencies, "all" everything.
PROFILE_PACKAGES = {"export": ("onnx", "onnxscript", "onnxruntime"), "tracking": ("tensorboard", "mlflow"),
                    "adapt": ("torchao",)}
# Distribution name -> import name, where they differ by more than "-" vs "_".
IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "opencv-python-headless": "cv2", "opencv-python": "cv2"}
TORCH_PIN = "torch==2.13.0"  # the Makefile's pin: the CPU wheel
WARN_FREE, FAIL_FREE = 2 * 1024**3, 200 * 1024**2


@dataclass
class DoctorCheck:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Requirement:
    name: str  # the distribution name, normalized ("faster-coco-eval")
    specifier: str = ""  # ">=1.20,<2"; "" = any version
    extra: str | None = None  # the detpact extra that installs it; None = a base dependency
    listed: bool = True  # False: no detpact dependency or extra names it


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(lines: list[str]) -> dict[str, Requirement]:
    """importlib.metadata.requires() lines ('onnxruntime<2,>=1.20', 'pytest>=8; extra == "test"') by name."""
    found = {}
    for line in lines:
        spec, _, marker = line.partition(";")
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", marker)
        if match:
            name = normalize(match.group(1))
            found[name] = Requirement(name, ordered(match.group(2)), extra.group(1) if extra else None)
    return found


def ordered(specifier: str) -> str:
    """'<2,>=1.20' -> '>=1.20,<2': lower bounds first, the way people write ranges."""
    return ",".join(sorted((p.strip() for p in specifier.split(",") if p.strip()), key=lambda p: p[0] != ">"))


def profile_requirements(profile: str, declared: dict[str, Requirement]) -> list[Requirement]:
    """The packages a profile checks, in order; a package no extra lists yet is marked listed=False."""
    base = [r for r in declared.values() if r.extra is None]
    names = [p for packages in PROFILE_PACKAGES.values() for p in packages] if profile == "all" else []
    names += list(PROFILE_PACKAGES.get(profile, ()))
    extras = [r for r in declared.values() if profile == "all" and r.extra not in (None, "test")]
    chosen = (base if profile in ("core", "all") else []) + extras
    chosen += [declared.get(name, Requirement(name, listed=False)) for name in names]
    return list({r.name: r for r in chosen}.values())


def install_command(req: Requirement) -> str:
    if req.name == "torch":  # a plain `pip install torch` fetches a multi-GB CUDA build
        return f"install torch first, as the pinned CPU wheel: pip install {TORCH_PIN}; then pip install -e ."
    if req.extra:
        return f"pip install 'detpact[{req.extra}]'"
    return f"pip install '{req.name}{req.specifier}'" if req.specifier else f"pip install {req.name}"


def in_range(version: str, specifier: str) -> bool | None:
    """Whether `version` satisfies `specifier` (PEP 440); None when `packaging` is missing."""
    try:  # onnxruntime and onnxscript bring packaging, but doctor must run where they are broken
        from packaging.specifiers import InvalidSpecifier, SpecifierSet
        from packaging.version import InvalidVersion
    except ImportError:
        return None
    try:
        return SpecifierSet(specifier).contains(version, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return None


def dependency_check(req: Requirement) -> DoctorCheck:
    supported = f"supported {req.specifier or 'any version'}"
    try:
        importlib.import_module(IMPORT_NAMES.get(req.name, req.name.replace("-", "_")))
    except Exception as exc:  # a broken binary raises OSError or worse, not only ImportError
        if not req.listed:
            return DoctorCheck(req.name, "warn", f"not part of this install (no detpact extra lists it yet): "
                               f"{install_command(req)}", install_command(req))
        return DoctorCheck(req.name, "fail", f"not importable ({type(exc).__name__}: {exc}); {supported}",
                           install_command(req))
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return DoctorCheck(req.name, "warn", f"importable but its version is unknown (no metadata); {supported}")
    if not req.listed:
        return DoctorCheck(req.name, "pass", f"{version} (detpact does not pin it)")
    ok = in_range(version, req.specifier)
    if ok is False:
        return DoctorCheck(req.name, "fail", f"{version} is outside the supported range {req.specifier}",
                           install_command(req))
    unchecked = " (range not checked: pip install packaging)" if ok is None and req.specifier else ""
    return DoctorCheck(req.name, "pass", f"{version}, {supported}{unchecked}")


def torch_checks(profile_names: set[str], environ: Mapping[str, str]) -> list[DoctorCheck]:
    """The torch build, thread settings and onnxruntime providers; [] for what does not import."""
    checks = []
    try:
        import torch
    except Exception:
        torch = None  # its dependency check already failed, with the fix
    if torch is not None:
        cuda = torch.version.cuda
        devices = torch.cuda.device_count() if cuda else 0
        cudnn = torch.backends.cudnn.version() if cuda else None
        detail = f"{torch.__version__}, {f'CUDA {cuda}' if cuda else 'CPU'} build, cuDNN {cudnn}, {devices} CUDA devices"
        no_gpu = cuda and devices == 0
        checks.append(DoctorCheck("torch build", "warn" if no_gpu else "pass",
                                  detail + ("; no GPU visible: runs use the CPU" if no_gpu else "")))
        threads, cores = torch.get_num_threads(), os.cpu_count() or 1
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
        env = ", ".join(f"{k}={environ.get(k, 'unset')}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
        detail = f"torch uses {threads} threads; {usable} usable of {cores} cores; {env}"
        over = threads > usable  # oversubscribed threads slow every step instead of speeding it up
        checks.append(DoctorCheck("threads", "warn" if over else "pass", detail,
                                  f"export OMP_NUM_THREADS={usable}" if over else ""))
    if "onnxruntime" in profile_names:
        try:
            import onnxruntime
        except Exception:
            return checks
        checks.append(DoctorCheck("onnxruntime providers", "pass", ", ".join(onnxruntime.get_available_providers())))
    return checks


def nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_checks(name: str, path: Path, env_var: str) -> list[DoctorCheck]:
    """`path` (or, while it does not exist, the folder it will be created in) is writable and has room."""
    existing = nearest_existing(path)
    fix = f"make {existing} writable (chmod u+w {existing}) or set {env_var} to a writable folder"
    where = f"{path}" if existing == Path(os.path.abspath(path)) else f"{path} (not yet created; in {existing})"
    if not existing.is_dir():
        writable = DoctorCheck(name, "fail", f"{where}: {existing} is not a folder", f"set {env_var} to a folder")
    else:
        try:  # os.access misjudges ACLs and read-only mounts; a real file does not
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".detpact-doctor-"):
                pass
            writable = DoctorCheck(name, "pass", f"{where}: writable")
        except OSError as exc:
            writable = DoctorCheck(name, "fail", f"{where}: cannot write ({exc.strerror or exc})", fix)
    free = shutil.disk_usage(existing).free
    detail = f"{free / 1024**3:.1f} GiB free at {existing}"
    more = f"free space on that disk or set {env_var} to a folder on another disk"
    status: Status = "fail" if free < FAIL_FREE else "warn" if free < WARN_FREE else "pass"
    return [writable, DoctorCheck(f"{name} disk", status, detail, more if status != "pass" else "")]


def run_doctor(profile: str, environ: Mapping[str, str]) -> list[DoctorCheck]:
    """Every check of `profile` (one of PROFILES), in the order they are printed."""
    if profile not in PROFILES:
        raise DetpactError(f"unknown doctor profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    checks = []
    try:
        supported = ordered(importlib.metadata.metadata("detpact").get("Requires-Python") or "")
        declared = parse_requirements(importlib.metadata.requires("detpact") or [])
    except importlib.metadata.PackageNotFoundError:
        checks.append(DoctorCheck("detpact install", "fail", "detpact is not installed: its dependency list is unknown",
                                  "pip install -e . (from the checkout)"))
        supported, declared = "", {}
    python, bad = platform.python_version(), in_range(platform.python_version(), supported) is False
    checks.insert(0, DoctorCheck("python", "fail" if bad else "pass", f"{python} ({sys.executable}), supported "
                                 f"{supported or 'any'}", f"use a Python {supported} venv" if bad else ""))
    requirements = profile_requirements(profile, declared)
    checks += [dependency_check(req) for req in requirements]
    checks += torch_checks({r.name for r in requirements}, environ)
    checks += folder_checks("cache folder", resolve_cache_dir(environ), "DETPACT_CACHE_DIR")
    checks += folder_checks("output root", resolve_output_root(None, environ), "DETPACT_OUTPUT_DIR")
    return checks


def doctor_report(profile: str, checks: list[DoctorCheck]) -> dict:
    """The --output-json document."""
    return {"profile": profile, "passed": not any(c.status == "fail" for c in checks),
            "checks": [asdict(c) for c in checks], "python": platform.python_version(),
            "platform": platform.platform(), "detpact_version": __version__}


def print_doctor(checks: list[DoctorCheck]) -> None:
    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    styles = {"pass": "green", "warn": "yellow", "fail": "bold red"}
    for check in checks:
        table.add_row(escape(check.name), f"[{styles[check.status]}]{check.status.upper()}[/]", escape(check.detail))
    out = Console(width=max(120, Console().width))
    out.print(table)
    failed = [c for c in checks if c.status == "fail"]
    if not failed:
        out.print(f"doctor: [green]PASS[/] ({len(checks)} checks)")
        return
    out.print(f"doctor: [bold red]FAIL[/] ({len(failed)} failed: {escape(', '.join(c.name for c in failed))})")
    for check in failed:
        out.print(f"  fix {escape(check.name)}: {escape(check.fix)}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser("doctor", help="check this environment: dependencies, torch build, folders")
    doctor.add_argument("--profile", choices=PROFILES, default="core",
                        help="what to check: core (base dependencies), export, tracking, adapt or all (default core)")
    doctor.add_argument("--output-json", metavar="FILE", help="also write every check to this JSON file")


def run(args: argparse.Namespace) -> int:
    """0 when no check fails, 1 when one does (a DetpactError, status 2, for bad input)."""
    output = Path(args.output_json) if args.output_json else None
    if output is not None and (output.is_dir() or not nearest_existing(output.parent).is_dir()):
        raise DetpactError(f"--output-json {output}: that is a folder or its parent is not; name a JSON file.")
    checks = run_doctor(args.profile, os.environ)
    print_doctor(checks)
    report = doctor_report(args.profile, checks)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output, report)
    return 0 if report["passed"] else 1


def main(argv: list[str]) -> int:
    """`detpact doctor ...` on its own (detpact.launch), importing nothing heavy first."""
    parser = argparse.ArgumentParser(prog="detpact")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *argv])
    try:
        return run(args)
    except DetpactError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
