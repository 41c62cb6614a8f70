"""``python -m lightning_cmp.bench.plots``: every figure of the docs is redrawn from the repository's saved JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lightning_cmp.bench import plots
from lightning_cmp.bench.time_to_accuracy import lacks_curves, plot_time_to_accuracy

ROOT = Path(__file__).resolve().parents[2]
#: rows whose JSON the repository does not hold yet (the benchmark has not been run for the docs)
NOT_RUN_YET: set[str] = set()
#: rows whose JSON lacks what their function needs (listed by --check, not drawn)
LACKING: set[str] = set()


def test_every_figure_is_drawn_from_the_saved_json(tmp_path: Path) -> None:
    outcome = plots.draw(plots.FIGURES, ROOT, tmp_path)
    skipped = {png for png, result in outcome.items() if result.startswith("skipped")}
    assert skipped <= NOT_RUN_YET | LACKING, outcome
    assert {png for png, result in outcome.items() if "lacks" in result} == LACKING
    for png, result in outcome.items():
        if png not in skipped:
            assert result == "wrote" and (tmp_path / png).stat().st_size > 5_000, (png, result)
    assert not (ROOT / "docs/bench/time_to_accuracy.json").exists() or "docs/img/time_to_accuracy.png" not in skipped


def test_every_figure_the_docs_show_has_a_row() -> None:
    shown = plots.shown_in_docs(ROOT)
    assert "docs/img/async_timeline.png" in shown and "docs/bench/scaleout_projection.png" in shown
    assert shown <= {figure.png for figure in plots.FIGURES}


def test_a_json_without_the_data_is_listed_not_drawn(tmp_path: Path) -> None:
    figures = [
        # the seeds' runs kept test accuracies only: no validation curve to draw
        plots.Figure("docs/bench/accuracy_seeds.json", "x/seeds.png", plot_time_to_accuracy, lacks_curves),
        plots.Figure("docs/bench/memory.json", "x/memory.png", None),
        plots.Figure("docs/bench/vgg.json", "x/vgg.png", plots.Lazy("lightning_cmp.bench.nothing:plot")),
    ]
    outcome = plots.draw(figures, ROOT, tmp_path)
    assert outcome["x/seeds.png"].startswith("skipped: docs/bench/accuracy_seeds.json lacks what the figure needs")
    assert outcome["x/memory.png"] == "skipped: no plotting function"
    assert outcome["x/vgg.png"].startswith("failed: ModuleNotFoundError")
    assert not list(tmp_path.rglob("*.png"))
    listing = plots.check(figures, ROOT)
    assert "docs/bench/memory.json -> x/memory.png: NOT DRAWN: no plotting function" in listing
    assert "x/vgg.png: NOT DRAWN: no plotting function: lightning_cmp.bench.nothing:plot" in listing


def test_check_lists_every_pair_and_draws_nothing(tmp_path: Path, capsys: Any) -> None:
    plots.main(["--check", "--root", str(ROOT), "--out", str(tmp_path)])
    listing = capsys.readouterr().out
    assert (
        "docs/bench/async.json -> docs/img/async_timeline.png: lightning_cmp.bench.asynchronous:plot_steps" in listing
    )
    assert (
        "docs/bench/vgg.json -> docs/img/bench_vgg_throughput.png: lightning_cmp.bench.summary:plot_throughput"
        in listing
    )
    for figure in plots.FIGURES:
        assert f"{figure.json} -> {figure.png}: " in listing
    assert "figures the docs show that no row draws: none" in listing
    assert "\n  docs/bench/accuracy_seeds.json\n" in listing  # no figure is drawn from it
    assert not any(tmp_path.iterdir())


def test_the_root_must_hold_the_docs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        plots.main(["--root", str(tmp_path)])
