"""The `train.*` key reference of docs/training.md, rendered from the config schema.

Each key's meaning is its attribute docstring (the string literal after the field, read by
pydantic with `use_attribute_docstrings`), so the schema is the one place it is written.

    python -m detpact.config.reference docs/training.md           # rewrite the generated table
    python -m detpact.config.reference docs/training.md --check   # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import difflib
import enum
import json
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from detpact.config.train import TrainConfig

BEGIN = "<!-- generated: train keys -->"
END = "<!-- end generated -->"
HEADER = ("<!-- written by `make docs` from the attribute docstrings in src/detpact/config/train.py: edit those -->\n"
          "\n| key | type | default | meaning |\n|---|---|---|---|")


def key_rows(model: type[BaseModel], prefix: str) -> list[str]:
    """One Markdown table row per key of `model`, depth first, in field order.

    A nested section gets a row of its own (no default) followed by its keys; an optional
    section (`X | None`) or a list of sections the same, with its default.
    """
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        section = _section_of(field.annotation, key)
        rows.append(f"| `{key}` | {type_text(field)} | {_default_cell(field)} | {_meaning(field, section, key)} |")
        if section is not None:
            rows += key_rows(section, f"{key}.")
    return rows


def render_block(model: type[BaseModel] = TrainConfig, prefix: str = "train.") -> str:
    """What goes between the BEGIN and END markers: a note, the table header and the rows."""
    return "\n".join([HEADER, *key_rows(model, prefix)])


def generated_block(page: str) -> str:
    """The text between the markers of `page` (without the blank lines around it)."""
    if page.count(BEGIN) != 1 or page.count(END) != 1 or page.index(BEGIN) > page.index(END):
        raise ValueError(f"the page needs one {BEGIN} line followed by one {END} line")
    return page.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def rewrite(page: str, block: str) -> str:
    """`page` with its generated block replaced by `block`; the hand-written rest is kept."""
    generated_block(page)  # the markers are there, once each
    head, rest = page.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{block}\n\n{END}{rest.split(END, 1)[1]}"  # a blank line ends the table


def type_text(field: FieldInfo) -> str:
    """`int ≥ 1 or null`, `one of `adamw`, `sgd``, `list[int]`, `float in [0, 1]`, ..."""
    annotation = field.annotation
    nullable = _nullable(annotation)
    if nullable:
        annotation = typing.Union[tuple(a for a in typing.get_args(annotation) if a is not type(None))]  # noqa: UP007
    text = _type_name(annotation)
    bounds = _bounds(field.metadata)
    if bounds:
        text = f"{text} {bounds}"
    return f"{text} or null" if nullable else text


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{_yaml(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{_yaml(m.value)}`" for m in annotation)
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """Interval constraints from Field(ge=..., lt=...) as `≥ 1`, `> 0` or `in [0, 1)`."""
    low = next(((m.ge, "[", "≥") for m in metadata if isinstance(m, at.Ge)), None)
    low = low or next(((m.gt, "(", ">") for m in metadata if isinstance(m, at.Gt)), None)
    high = next(((m.le, "]", "≤") for m in metadata if isinstance(m, at.Le)), None)
    high = high or next(((m.lt, ")", "<") for m in metadata if isinstance(m, at.Lt)), None)
    if low and high:
        return f"in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low or high:
        value, _, sign = low or high
        return f"{sign} {value:g}"
    return ""


def _default_cell(field: FieldInfo) -> str:
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    return "" if isinstance(value, BaseModel) else f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A default as it would be written in a config file: null, true, 0.002, [0.9, 0.999], adamw."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (bool, int, float)) or value is None:
        return json.dumps(value)
    return str(value)


def _meaning(field: FieldInfo, section: type[BaseModel] | None, key: str) -> str:
    text = field.description or (section.__doc__ if section is not None else None)
    if not text:
        raise ValueError(f"{key} has no meaning to document: write it as a docstring on the line after the field")
    return " ".join(text.split()).replace("|", "\\|")


def _nullable(annotation: Any) -> bool:
    return type(None) in typing.get_args(annotation)


def _section_of(annotation: Any, key: str) -> type[BaseModel] | None:
    sections = [a for a in _members(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    if len(sections) > 1:
        raise NotImplementedError(f"{key}: a choice between sections is not rendered yet")
    return sections[0] if sections else None


def _members(annotation: Any) -> Iterator[Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        yield from typing.get_args(annotation)
    else:
        yield annotation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detpact.config.reference", description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path, help="the Markdown page holding the generated block (docs/training.md)")
    parser.add_argument("--check", action="store_true", help="exit 1 when the block differs from the schema")
    args = parser.parse_args(argv)
    page = args.page.read_text()
    try:
        current = generated_block(page)
    except ValueError as error:
        print(f"{args.page}: {error}", file=sys.stderr)
        return 2
    block = render_block()
    if args.check:
        if current == block:
            return 0
        diff = difflib.unified_diff(current.splitlines(), block.splitlines(), "page", "schema", lineterm="")
        print(f"{args.page}: the train keys table is stale; run `make docs`\n" + "\n".join(diff), file=sys.stderr)
        return 1
    if current != block:
        args.page.write_text(rewrite(page, block))
        print(f"{args.page}: train keys table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
