"""docs/training.md's table of train.* keys is what the schema renders now."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field
from test_docs import TRAINING, schema_keys  # tests/unit is on sys.path (rootdir-relative imports)

from detpact.config import Config
from detpact.config.reference import BEGIN, END, generated_block, key_rows, main, render_block, rewrite
from detpact.config.section import Section


def test_generated_block_matches_the_schema():
    assert generated_block(TRAINING.read_text()) == render_block(), \
        "docs/training.md's train keys table is stale: run `make docs`"


def test_every_train_key_has_a_row_in_the_generated_block():
    keys = [key for key in schema_keys(Config) if key.startswith("train.")]
    assert len(keys) > 30, keys  # the walk found the nested sections
    block = generated_block(TRAINING.read_text())
    missing = [key for key in keys if f"\n| `{key}` | " not in block]
    assert not missing, f"run `make docs`: docs/training.md lacks {missing}"


class _Inner(Section):
    depth: int = Field(3, ge=1)
    """how deep"""


class _Toy(Section):
    mode: Literal["fast", "exact"] = "fast"
    """how to run:
    `fast` or `exact`"""
    limit: int | None = Field(None, ge=1)
    """at most this many; `null` = no limit"""
    sizes: list[int] = [8, 16]
    """sizes tried | in order"""
    rate: float = Field(0.5, gt=0.0, le=1.0)
    """a rate"""
    pair: tuple[float, float] = (0.9, 0.999)
    """two floats"""
    on: bool = True
    """a switch"""
    inner: _Inner = _Inner()
    """the inner part"""
    extra: _Inner | None = None
    """an optional part"""


def test_rows_of_a_small_section():
    assert key_rows(_Toy, "toy.") == [
        "| `toy.mode` | one of `fast`, `exact` | `fast` | how to run: `fast` or `exact` |",
        "| `toy.limit` | int ≥ 1 or null | `null` | at most this many; `null` = no limit |",
        "| `toy.sizes` | list[int] | `[8, 16]` | sizes tried \\| in order |",
        "| `toy.rate` | float in (0, 1] | `0.5` | a rate |",
        "| `toy.pair` | [float, float] | `[0.9, 0.999]` | two floats |",
        "| `toy.on` | bool | `true` | a switch |",
        "| `toy.inner` | section |  | the inner part |",
        "| `toy.inner.depth` | int ≥ 1 | `3` | how deep |",
        "| `toy.extra` | section or null | `null` | an optional part |",
        "| `toy.extra.depth` | int ≥ 1 | `3` | how deep |",
    ]


def test_a_key_without_a_docstring_is_an_error():
    class Bare(Section):
        size: int = 1

    with pytest.raises(ValueError, match="bare.size has no meaning"):
        key_rows(Bare, "bare.")


def test_rewrite_replaces_only_the_block(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nintro\n\n{BEGIN}\n| `old` | row |\n{END}\n\n## After\n\nhand-written\n")
    assert main([str(page), "--check"]) == 1
    assert main([str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{END}\n\n## After\n\nhand-written\n")
    assert "`old`" not in text and generated_block(text) == render_block()
    assert main([str(page), "--check"]) == 0
    assert rewrite(text, render_block()) == text  # idempotent


def test_a_page_without_markers_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\n{END}\n{BEGIN}\n")
    assert main([str(page), "--check"]) == 2
    with pytest.raises(ValueError, match="generated"):
        rewrite(page.read_text(), "x")
