"""The layer rule of STYLE.md, checked on the source: schedule/ and the solver are pure Python; only the glue,
the examples and the data/model helpers import Lightning."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_cmp"

TORCH_FREE = ("schedule/", "partition/solver.py", "partition/bipartition.py")
LIGHTNING_ALLOWED = (
    "strategy.py",
    "pytorch_lightning.py",
    "__init__.py",
    "data/",
    "models/",
    "callbacks.py",
    "quickstart.py",
    "cli.py",
    "checkpoint_io.py",
    "soak.py",
    # The memory benchmark trains through the Trainer, as a user's script does (DDP and single device included).
    "bench/memory_probe.py",
    "bench/memory_run.py",
    # The GPU smoke test's last check fits through the Trainer (one worker per GPU), as a user's script does.
    "bench/gpu_smoke.py",
    # The benchmarks' Trainer rows (scale-out and the others) compare Lightning's ddp with our strategies, as a user
    # would: the Trainer-level timing harness.
    "bench/trainer.py",
)
TORCH = {"torch", "torchvision", "lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics"}
LIGHTNING = {"lightning", "pytorch_lightning", "lightning_fabric"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _matches(rel: str, patterns: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in patterns)


def _imported_roots(path: Path) -> dict[str, int]:
    """Top-level names of every absolute import in the file (also inside functions), with a line number."""
    roots: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            roots.setdefault(name.split(".")[0], node.lineno)
    return roots


def _violations(checked: Callable[[str], bool], forbidden: set[str]) -> list[str]:
    """``file:line imports X`` for every checked module importing a forbidden top-level package."""
    found = []
    for path in _modules():
        if not checked(_rel(path)):
            continue
        for root, line in _imported_roots(path).items():
            if root in forbidden:
                found.append(f"lightning_cmp/{_rel(path)}:{line} imports {root}")
    return found


def test_package_is_found() -> None:
    assert PACKAGE.is_dir() and any(PACKAGE.rglob("*.py"))


def test_schedule_and_solver_import_no_torch() -> None:
    bad = _violations(lambda rel: _matches(rel, TORCH_FREE), TORCH)
    assert not bad, "schedule/ and the partition solvers must be pure Python:\n" + "\n".join(bad)


def test_only_the_glue_imports_lightning() -> None:
    bad = _violations(lambda rel: not _matches(rel, LIGHTNING_ALLOWED), LIGHTNING)
    assert not bad, f"only {', '.join(LIGHTNING_ALLOWED)} may import Lightning:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("rel", "patterns", "expected"),
    [
        ("schedule/cmp.py", TORCH_FREE, True),
        ("partition/solver.py", TORCH_FREE, True),
        ("partition/trace.py", TORCH_FREE, False),
        ("runtime/__init__.py", LIGHTNING_ALLOWED, False),
        ("__init__.py", LIGHTNING_ALLOWED, True),
        ("data/fashion_mnist.py", LIGHTNING_ALLOWED, True),
    ],
)
def test_patterns(rel: str, patterns: tuple[str, ...], expected: bool) -> None:
    assert _matches(rel, patterns) is expected
