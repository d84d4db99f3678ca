"""Loading a config: YAML, `--set` overrides, validation errors for people, the hash and diffs.

Priority is CLI `--set` > YAML file > schema defaults. Unknown keys at any depth
are rejected with the valid keys named; wrong types name the key.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from detpact.config.tree import CONFIG_VERSION, Config
from detpact.errors import DetpactError

# Keys that do not change what a run computes (the thread count only its last bits):
# they are left out of the config hash, so e.g. renaming a run, moving its output
# folder or resuming on another machine does not block `--resume`.
HASH_EXCLUDED_KEYS = (
    ("run", "name"),
    ("run", "output_root"),
    ("run", "num_threads"),
    ("task",),
    ("data", "num_workers"),
    ("data", "cache"),
    ("train", "ddp", "timeout_s"),
    ("logging",),
    ("registry",),
)



def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set key.path=value` overrides and validate it."""
    path = Path(path)
    raw = _read_with_base(path, ())
    for override in overrides:
        _apply_override(raw, override)
    return validate_config(raw, source=str(path))


def load_config_or_dataset(target: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A detpact config, or for a dataset (a folder, an Ultralytics dataset YAML, a COCO
    JSON) the default config training on it (`data.path` = the dataset, format auto)."""
    path = Path(target)
    if is_config_file(path) or not path.exists():  # a missing file: load_config names it
        return load_config(path, overrides)
    raw: dict[str, Any] = {"config_version": CONFIG_VERSION, "run": {"name": path.stem or "dataset"},
                           "data": {"path": str(path)}}
    for override in overrides:
        _apply_override(raw, override)
    return validate_config(raw, source=f"the default config for the dataset {path}")


def is_config_file(path: Path) -> bool:
    """Whether `path` is a detpact config (a YAML file with `config_version`) rather than,
    say, an Ultralytics dataset YAML. A YAML file that cannot be read counts as a config,
    so that load_config reports what is wrong with it."""
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return True
    return isinstance(raw, dict) and "config_version" in raw


def validate_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw mapping against the schema; errors become one DetpactError."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe_error(err, raw) for err in exc.errors()]
        listing = "\n".join(f"  - {p}" for p in problems)
        raise DetpactError(
            f"Invalid config {source}:\n{listing}\n"
            "Fix the key in the YAML file (or the --set override) and run again."
        ) from None


def resolved_dict(config: Config) -> dict[str, Any]:
    """The fully resolved config as plain JSON-compatible data."""
    return config.model_dump(mode="json")


def config_hash(config: Config | dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the resolved config, minus result-neutral keys."""
    canonical = json.dumps(_hashed_view(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _hashed_view(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The resolved config as plain data without HASH_EXCLUDED_KEYS: what the hash covers."""
    data = resolved_dict(config) if isinstance(config, Config) else json.loads(json.dumps(config))
    for key_path in HASH_EXCLUDED_KEYS:
        node = data
        for key in key_path[:-1]:
            node = node.get(key, {})
        node.pop(key_path[-1], None)
    return data


def dump_config_yaml(config: Config) -> str:
    """YAML text of the resolved config; loading it back gives the same hash."""
    header = "# Fully resolved detpact config (defaults filled, overrides applied).\n"
    return header + yaml.safe_dump(resolved_dict(config), sort_keys=False)


def diff_configs(old: Config | dict[str, Any], new: Config | dict[str, Any]) -> list[str]:
    """`key.path: old -> new` for every hashed key that differs: why two configs hash apart."""
    return _diff_dicts(_hashed_view(old), _hashed_view(new), prefix="")


def _diff_dicts(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_diff_dicts(a, b, prefix=f"{path}."))
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")
    return diffs


def _read_with_base(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The YAML mapping at `path` laid over the file its `base:` key names (relative to
    `path`, itself possibly based on another): a preset reads as a short diff over a
    commented base config. Nested sections merge key by key; other values replace."""
    raw = _read_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise DetpactError(f"'base' in {path} must be the path of another config file, got {base!r}.")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        raise DetpactError(f"Config {path} is its own base (through {' -> '.join(map(str, chain))}): "
                           "remove the cycle of 'base:' keys.")
    return _merged(_read_with_base(base_path, (*chain, path.resolve())), raw)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DetpactError(
            f"Config file not found: {path}. Pass the path of a YAML config "
            "(see configs/quickstart.yaml for a complete example)."
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DetpactError(f"Config file {path} is not valid YAML: {exc}. Fix the syntax and run again.") from None
    except UnicodeDecodeError:
        raise DetpactError(f"Config file {path} is not UTF-8 text. Save it as UTF-8 YAML.") from None
    if not isinstance(data, dict):
        raise DetpactError(
            f"Config file {path} must hold a YAML mapping (key: value lines), "
            f"not {type(data).__name__}. Start from configs/quickstart.yaml."
        )
    return data


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in the raw mapping; the value is parsed as YAML (1e-3 -> float)."""
    key, sep, text = override.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(keys):
        raise DetpactError(
            f"Bad --set override {override!r}: use --set section.key=value, e.g. --set train.epochs=5."
        )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in keys[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise DetpactError(f"Bad --set override {override!r}: '{part}' is a value, not a section.")
        node = child
    node[keys[-1]] = value


def _describe_error(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        parent = ".".join(loc[:-1])
        valid = _section_fields(loc[:-1])
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
        where = f"in '{parent}'" if parent else "at the top level"
        return f"unknown key '{dotted}'.{did_you_mean} Valid keys {where}: {', '.join(valid)}."
    if err["type"] == "missing":
        return f"'{dotted}' is required but missing."
    if err["type"] == "value_error" and err["msg"].startswith("Value error, "):  # a section's own check
        return f"'{dotted}': {err['msg'].removeprefix('Value error, ')}."
    got = _lookup(raw, err["loc"])
    return f"'{dotted}': {err['msg']} (got {got!r})."


def _section_fields(loc: list[str]) -> list[str]:
    """Field names of the schema section at `loc` (e.g. ['train', 'optimizer'])."""
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        # `Section | None` fields: the section is the union's model member
        candidates = typing.get_args(field.annotation) or (field.annotation,) if field else ()
        sections = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)


def _lookup(raw: Any, loc: tuple[Any, ...]) -> Any:
    node = raw
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node
