"""``python -m lightning_cmp.bench.plots``: redraw every figure of the docs from the JSON it was drawn from.

Each row of `FIGURES` names a JSON file, the PNG drawn from it and the function that draws it (a callable taking
the loaded JSON and the output path). The command rewrites every PNG (``--out DIR``: under DIR instead, same
relative paths); ``--check`` only lists the rows and says which cannot be drawn (no function, no JSON yet, or a
JSON without data the function needs), which figures the docs show that no row draws, and which JSON files no
figure is drawn from. Run it from the repository root (or give ``--root``).

Adding a figure is one row::

    Figure("docs/bench/mine.json", "docs/img/mine.png", Lazy("lightning_cmp.bench.mine:plot")),
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_cmp.bench.accuracy import plot_curves
from lightning_cmp.bench.time_to_accuracy import lacks_curves, plot_time_to_accuracy

__all__ = [
    "FIGURES",
    "Figure",
    "Lazy",
    "blocked",
    "check",
    "draw",
    "main",
    "requires",
    "shown_in_docs",
]

PlotFn = Callable[[dict[str, Any], Path], object]
#: what a JSON lacks for a figure, or None when it has everything
NeedsFn = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class Lazy:
    """The plotting function ``"module:function"``, imported when called: a module that imports torch is loaded
    only to draw, and a broken one only fails its own rows.

    Examples:
        >>> Lazy("lightning_cmp.bench.accuracy:plot_curves").resolve().__name__
        'plot_curves'
    """

    target: str

    def resolve(self) -> PlotFn:
        module, name = self.target.split(":")
        function: PlotFn = getattr(importlib.import_module(module), name)
        return function

    def __call__(self, record: dict[str, Any], path: Path) -> object:
        return self.resolve()(record, path)

    def __str__(self) -> str:
        return self.target


@dataclass(frozen=True)
class Figure:
    """One figure of the docs: the JSON it is drawn from, the PNG (both relative to the repository root), the
    function that draws it (None: nothing does yet) and, optionally, what the JSON must hold for it."""

    json: str
    png: str
    plot: PlotFn | None
    needs: NeedsFn | None = None


def requires(*keys: str) -> NeedsFn:
    """A `Figure.needs` that asks for non-empty top-level ``keys``.

    Examples:
        >>> requires("timelines")({"rows": []})
        "no 'timelines' in the JSON"
    """

    def missing(record: dict[str, Any]) -> str | None:
        return next((f"no {key!r} in the JSON" for key in keys if not record.get(key)), None)

    return missing


#: the main benchmark's figures (``python -m lightning_cmp.bench``), one JSON per model
_THROUGHPUT, _TIMELINE = (
    Lazy("lightning_cmp.bench.summary:plot_throughput"),
    Lazy("lightning_cmp.bench.summary:plot_timeline"),
)
BENCH_RUNS = ("vgg", "resnet18_cifar", "resnet50", "vgg16")

FIGURES: list[Figure] = [
    *(Figure(f"docs/bench/{n}.json", f"docs/img/bench_{n}_throughput.png", _THROUGHPUT, requires("rows"))
      for n in BENCH_RUNS),
    *(Figure(f"docs/bench/{n}.json", f"docs/img/bench_{n}_timeline.png", _TIMELINE, requires("timelines"))
      for n in BENCH_RUNS),
    Figure("docs/bench/accuracy_async.json", "docs/img/accuracy_async.png", plot_curves, lacks_curves),
    Figure("docs/bench/async.json", "docs/img/async_throughput.png", Lazy("lightning_cmp.bench.asynchronous:plot")),
    Figure("docs/bench/async.json", "docs/img/async_timeline.png", Lazy("lightning_cmp.bench.asynchronous:plot_steps")),
    Figure("docs/bench/bipartition.json", "docs/img/bipartition_imbalance.png",
           Lazy("lightning_cmp.bench.bipartition:plot_imbalance")),
    Figure("docs/bench/bipartition.json", "docs/img/bipartition_cuts.png",
           Lazy("lightning_cmp.bench.bipartition:plot_cuts")),
    Figure("docs/bench/scaleout.json", "docs/bench/scaleout_projection.png",
           Lazy("lightning_cmp.bench.scaleout:plot_projection"), requires("projection")),
    Figure("docs/bench/time_to_accuracy.json", "docs/img/time_to_accuracy.png", plot_time_to_accuracy, lacks_curves),
]  # fmt: skip


def _name(plot: PlotFn) -> str:
    if isinstance(plot, Lazy):
        return str(plot)
    module = __spec__.name if plot.__module__ == "__main__" and __spec__ else plot.__module__  # run with -m
    return f"{module}:{plot.__qualname__}"


def blocked(figure: Figure, root: Path, resolve: bool = False, record: dict[str, Any] | None = None) -> str | None:
    """Why ``figure`` cannot be drawn from the files under ``root``, or None; ``resolve`` also imports a `Lazy`.
    ``record``: its JSON, already read (else it is read here)."""
    if figure.plot is None:
        return "no plotting function"
    if resolve and isinstance(figure.plot, Lazy):
        try:
            figure.plot.resolve()
        except (ImportError, AttributeError, ValueError) as err:
            return f"no plotting function: {figure.plot} ({err})"
    if record is None:
        record = _read(root / figure.json)
    if record is None:
        return f"no {figure.json} yet: run the benchmark that writes it"
    lacking = figure.needs(record) if figure.needs else None
    return f"{figure.json} lacks what the figure needs: {lacking}" if lacking else None


def draw(figures: Sequence[Figure], root: Path, out: Path) -> dict[str, str]:
    """Draw every figure that can be, from the JSON under ``root`` into ``out`` (same relative paths); per PNG:
    ``"wrote"``, ``"skipped: <why>"`` or ``"failed: <error>"``."""
    import matplotlib

    matplotlib.use("Agg")
    outcome = {}
    for figure in figures:
        record = _read(root / figure.json)
        why = blocked(figure, root, record=record)
        if why is not None or figure.plot is None or record is None:
            outcome[figure.png] = f"skipped: {why}"
            continue
        target = out / figure.png
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            figure.plot(record, target)
            outcome[figure.png] = "wrote"
        except Exception as err:  # one broken figure does not stop the others; main exits 1
            outcome[figure.png] = f"failed: {type(err).__name__}: {err}"
    return outcome


def _read(source: Path) -> dict[str, Any] | None:
    return json.loads(source.read_text()) if source.is_file() else None


_SHOWN = re.compile(r"\]\(((?:img|bench)/[\w./-]+\.png)\)")


def shown_in_docs(root: Path) -> set[str]:
    """The PNGs the docs' pages show (``![...](img/x.png)``), relative to ``root``."""
    return {f"docs/{m}" for page in (root / "docs").glob("*.md") for m in _SHOWN.findall(page.read_text())}


def check(figures: Sequence[Figure], root: Path) -> str:
    """The ``--check`` listing: one line per row, then the docs' figures no row draws and the JSON no row reads."""
    lines = []
    for figure in figures:
        why = blocked(figure, root, resolve=True)
        drawn_by = _name(figure.plot) if figure.plot is not None else ""
        lines.append(f"{figure.json} -> {figure.png}: " + (f"NOT DRAWN: {why}" if why else drawn_by))
    undrawn = sorted(shown_in_docs(root) - {f.png for f in figures})
    unread = sorted(
        {p.relative_to(root).as_posix() for p in (root / "docs/bench").glob("*.json")} - {f.json for f in figures}
    )
    lines.append("figures the docs show that no row draws:" + ("".join(f"\n  {png}" for png in undrawn) or " none"))
    lines.append("JSON no figure is drawn from:" + ("".join(f"\n  {path}" for path in unread) or " none"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--root", type=Path, default=Path("."), help="the repository root (where docs/ is)")
    p.add_argument("--out", type=Path, default=None, help="write the PNGs under this folder (default: --root)")
    p.add_argument("--check", action="store_true", help="only list JSON -> PNG and what cannot be drawn")
    args = p.parse_args(argv)
    if not (args.root / "docs" / "bench").is_dir():
        p.error(f"--root {args.root}: no docs/bench there; run from the repository root or pass --root")
    if args.check:
        print(check(FIGURES, args.root))
        return
    outcome = draw(FIGURES, args.root, args.out or args.root)
    for png, result in outcome.items():
        print(f"{png}: {result}")
    if any(result.startswith("failed") for result in outcome.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
