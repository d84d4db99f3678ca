"""The documentation stays true to the code: every config key is documented."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from detpact.config import Config
from detpact.config.model import BACKBONE_ARGS

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
TRAINING = DOCS.parent / "training.md"  # the train.* keys, generated from the schema (tests/unit/test_training_docs.py)


def page_of(key: str) -> Path:
    return TRAINING if key.startswith("train.") else DOCS


def documented_keys(page: Path) -> set[str]:
    return {line.split("`")[1] for line in page.read_text().splitlines() if line.startswith("| `")}


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
    for page, fix in ((DOCS, "add these keys to docs/config.md"), (TRAINING, "run `make docs` to add them to docs/training.md")):
        text = page.read_text()
        keys = [key for key in schema_keys(Config) if page_of(key) == page]
        assert keys, f"no config key belongs to {page.name}"
        missing = [key for key in keys if f"| `{key}` |" not in text]
        assert not missing, f"{fix}: {missing}"


def test_documented_keys_exist():
    keys = set(schema_keys(Config))
    sections = {key.rsplit(".", 1)[0] for key in keys}
    for page in (DOCS, TRAINING):
        own = keys | sections if page == TRAINING else keys  # training.md has a row per nested section too
        stray = documented_keys(page) - {key for key in own if page_of(key) == page}
        assert not stray, f"docs/{page.name} documents keys that are not its own config keys: {stray}"


def test_every_backbone_and_its_args_are_in_the_models_page():
    table = [line for line in (DOCS.parent / "models.md").read_text().splitlines() if line.startswith("| `")]
    for name, schema in BACKBONE_ARGS.items():
        row = next((line for line in table if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"docs/models.md has no row for backbone {name}"
        documented = row.split("|")[2]
        missing = [arg for arg in schema.model_fields if f"`{arg}" not in documented and "as resnet18" not in documented]
        assert not missing, f"docs/models.md: {name}'s args {missing} are not documented"
