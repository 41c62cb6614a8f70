"""Every ```python block of the tutorial pages runs, so the docs cannot rot; the docs site builds strictly."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
TUTORIALS = ["index.md", "how-cmp-works.md", "choosing.md", "own-module.md", "troubleshooting.md", "recipes.md"]
#: the only reasons a block may be left out: it needs hardware CI does not have
SKIP_REASONS = {"gpu", "cluster"}

_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python[^\n]*\n(?P<code>.*?)\n```", re.DOTALL)
_SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>[\w-]+)\s*-->")


def python_blocks(page: str) -> list[tuple[str, str | None]]:
    """(code, skip reason or None) for every ```python block, the reason taken from the line before it."""
    text = (DOCS / page).read_text()
    blocks = []
    for match in _BLOCK.finditer(text):
        skip = _SKIP.search(match["before"])
        blocks.append((textwrap.dedent(match["code"]), skip["reason"] if skip else None))
    return blocks


def _launches_workers(code: str) -> bool:
    """A block that starts a multi-process Trainer: Lightning re-runs its script, so it runs as one."""
    return "Trainer(" in code and "devices=2" in code and ".fit(" in code


def _without_trainer(code: str) -> str:
    """The block's definitions only: statements that build or use a Trainer run in the subprocess instead."""
    tree = ast.parse(code)
    tree.body = [s for s in tree.body if "trainer" not in ast.unparse(s).lower()]
    return ast.unparse(tree)


def test_skip_markers_are_only_for_gpu_or_cluster_snippets() -> None:
    for page in TUTORIALS:
        for code, reason in python_blocks(page):
            assert reason is None or reason in SKIP_REASONS, f"{page}: skip: {reason} on\n{code}"


def test_quickstart_is_ten_lines() -> None:
    code = next(code for code, _ in python_blocks("index.md") if 'strategy="cmp"' in code)
    assert len([line for line in code.splitlines() if line.strip()]) <= 10, code


@pytest.mark.parametrize("page", TUTORIALS)
def test_tutorial_blocks_run_in_process(page: str, capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, object] = {"__name__": "tutorial"}
    for code, reason in python_blocks(page):
        if reason is None:
            exec(compile(_without_trainer(code) if _launches_workers(code) else code, page, "exec"), namespace)
    if page == "troubleshooting.md":  # every example there must show an error message
        assert capsys.readouterr().out.count("Error: ") >= 6


LAUNCHING = [(page, code) for page in TUTORIALS for code, reason in python_blocks(page) if reason is None]
LAUNCHING = [(page, code) for page, code in LAUNCHING if _launches_workers(code)]


@pytest.mark.slow
@pytest.mark.parametrize("page,code", LAUNCHING, ids=[page for page, _ in LAUNCHING])
def test_tutorial_multiprocess_blocks_run_as_scripts(page: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "tutorial.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_tutorial_page_is_in_the_nav() -> None:
    nav = (DOCS.parent / "mkdocs.yml").read_text()
    for page in TUTORIALS:
        assert f": {page}" in nav, f"{page} is missing from the nav of mkdocs.yml"


PUBLIC = ["lightning_cmp", "lightning_cmp.data", "lightning_cmp.models", "lightning_cmp.cli"]


@pytest.mark.parametrize("package", PUBLIC)
def test_api_reference_lists_every_public_name(package: str) -> None:
    import importlib

    api = (DOCS / "api.md").read_text()
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if f"::: {package}.{name}\n" not in api]
    assert not missing, f"add to docs/api.md: {', '.join(f'::: {package}.{n}' for n in missing)}"


def test_timetables_are_rendered_by_the_schedule_layer() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown((DOCS / "how-cmp-works.md").read_text())
    assert "<!--" not in page, "a marker was not expanded"
    assert page.count('```text title="cmp, num_stages=') == 3 and "rank 3:" in page
    assert "| `cmp` | 3.0 |" in page
