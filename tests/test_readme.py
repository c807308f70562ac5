"""The README's Python examples run as written (blocks after a `no-test` comment are skipped)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"(<!--[^>]*-->\n)?```python\n(.*?)```", text, flags=re.S):
        if match.group(1) and "no-test" in match.group(1):
            continue
        blocks.append(match.group(2))
    return blocks


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    # Blocks build on each other (quick start, then hooks), so run the earlier ones first.
    for block in python_blocks()[: index + 1]:
        exec(compile(block, f"README block {index}", "exec"), namespace)
