"""The documentation stays true to the code: every config key is documented."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from detpact.config import Config
from detpact.config.model import BACKBONE_ARGS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sections = [a for a in typing.get_args(field.annotation) or (field.annotation,)
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        if sections and not typing.get_args(field.annotation):
            keys += schema_keys(sections[0], f"{prefix}{name}.")
        elif sections:  # an optional section: documented itself and key by key
            keys += [f"{prefix}{name}", *schema_keys(sections[0], f"{prefix}{name}.")]
        else:
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_documented():
    text = DOCS.read_text()
    missing = [key for key in schema_keys(Config) if f"| `{key}` |" not in text]
    assert not missing, f"add these keys to docs/config.md: {missing}"


def test_documented_keys_exist():
    documented = {line.split("`")[1] for line in DOCS.read_text().splitlines() if line.startswith("| `")}
    assert documented <= set(schema_keys(Config)), documented - set(schema_keys(Config))


def test_every_backbone_and_its_args_are_in_the_models_page():
    table = [line for line in (DOCS.parent / "models.md").read_text().splitlines() if line.startswith("| `")]
    for name, schema in BACKBONE_ARGS.items():
        row = next((line for line in table if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/models.md has no row for backbone {name}"
        documented = row.split("|")[2]
        missing = [arg for arg in schema.model_fields if f"`{arg}" not in documented and "as resnet18" not in documented]
        assert not missing, f"docs/models.md: {name}'s args {missing} are not documented"
