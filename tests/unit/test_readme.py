"""The README's and the docs' Python examples run exactly as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


CASES = [(path, index, block) for path in DOCS for index, block in enumerate(python_blocks(path))]


@pytest.mark.parametrize(("path", "index", "block"), CASES, ids=[f"{p.name}-{i}" for p, i, _ in CASES])
def test_example_runs(path: Path, index: int, block: str) -> None:
    exec(compile(block, f"{path.name}[{index}]", "exec"), {"__name__": "__readme__"})


def test_readme_has_examples() -> None:
    assert python_blocks(ROOT / "README.md")
