"""Every ```python block of README.md and docs/*.md runs as written (keeps the docs true).

Each block runs on its own, in a fresh namespace, in an empty temporary working directory: a block must be complete
(no name left to the reader). A block that imports an optional package (MONAI, Ignite, torchmetrics, Lightning,
nibabel, SimpleITK, matplotlib, nilearn, Triton) is skipped only when that package is not installed; a block whose
import fails for any other package fails. A block that must not run (a sketch, a command needing data the reader
has) carries the marker line ``<!-- docs-test: skip (why) -->`` right above its opening fence; the reason is
required and shown in the test report.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONAL = {"monai", "ignite", "torchmetrics", "lightning", "nibabel", "SimpleITK", "matplotlib", "nilearn", "triton"}
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\((?P<why>[^)]+)\)\s*-->\s*$")
FENCE = re.compile(r"^```python\s*\n(?P<code>.*?)^```\s*$", flags=re.S | re.M)


def _blocks() -> list[tuple[str, str, str | None]]:
    """``(id, code, skip reason or None)`` of every ```python block."""
    out = []
    for path in FILES:
        text = path.read_text()
        for k, m in enumerate(FENCE.finditer(text)):
            line = text.count("\n", 0, m.start()) + 1
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            skip = SKIP.search(before)
            out.append((f"{path.relative_to(ROOT)}:{line}[{k}]", m.group("code"), skip.group("why") if skip else None))
    return out


BLOCKS = _blocks()


def _imported(code: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_docs_have_python_examples():
    assert len(BLOCKS) >= 8, "README.md and docs/ lost their Python examples"
    assert any(b[0].startswith("README.md") for b in BLOCKS)
    assert any("integrations.md" in b[0] for b in BLOCKS)


def test_skip_marker_needs_a_reason():
    assert SKIP.search("<!-- docs-test: skip (needs your data) -->")
    assert not SKIP.search("<!-- docs-test: skip -->")
    for path in FILES:
        for line in path.read_text().splitlines():
            if "docs-test:" in line:
                assert SKIP.search(line), f"{path.name}: malformed docs-test marker {line!r}"


@pytest.mark.parametrize("block", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_python_block_runs(block, tmp_path, monkeypatch):
    where, code, skip = block
    if skip is not None:
        pytest.skip(f"marked docs-test: skip ({skip})")
    missing = sorted(m for m in _imported(code) if importlib.util.find_spec(m) is None)
    if missing:
        optional = [m for m in missing if m in OPTIONAL]
        assert optional == missing, f"{where} imports {missing}, not installed and not an optional dependency"
        pytest.skip(f"needs the optional package(s) {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)  # files a block writes land here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})
    assert os.getcwd() == str(tmp_path)
