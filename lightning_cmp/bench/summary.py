"""The main benchmark's tables and plots, built from its JSON record alone (the docs render them from the file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning_cmp.bench.ideal import ideal_step
from lightning_cmp.bench.methods import BREAKDOWN, METHODS
from lightning_cmp.bench.report import bar_chart, projection_table
from lightning_cmp.bench.timeline import plot_timelines

__all__ = ["overview", "plot_record", "plot_throughput", "plot_timeline", "tables", "tables_from_json"]


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _spread(values: list[float] | None) -> str:
    return "" if not values or len(values) < 2 else f" ({min(values):.1f}–{max(values):.1f})"


def profile_table(record: dict[str, Any]) -> str:
    """The whole model's measured compute and the ideal steps made from it (`lightning_cmp.bench.ideal`)."""
    p, b = record["compute_profile"], record["config"]["batch_size"]
    whole = p["whole_s"]
    ideal_cmp, ideal_mp = ideal_step("cmp", p, b), ideal_step("mp", p, b)
    assert ideal_cmp is not None and ideal_mp is not None
    lines = [
        "| measured (1 process, 1 thread) | seconds |",
        "|---|---|",
        f"| forward + backward, whole model, batch {b} = T(B) | {whole[str(b)]:.4f} |",
        f"| forward + backward, whole model, batch {b // 2} = T(B/2) | {whole[str(b // 2)]:.4f} |",
        f"| the same, two processes at once (co-run), each | {p['corun_half_s']:.4f} |",
        f"| optimizer step, whole model (SGD, momentum) | {p['optimizer_s']:.4f} |",
        *(
            [f"| freeing the gradients, whole model (`zero_grad()`) | {p['free_grads_s']:.4f} |"]
            if "free_grads_s" in p
            else []
        ),
        f"| half-batch efficiency T(B) / (2 T(B/2)) | {p['half_batch_efficiency']:.3f} |",
        f"| co-run factor (co-run T(B/2) / T(B/2)) | {p['corun_factor']:.3f} |",
        f"| ideal `cmp` / DDP step: T(B/2) + optimizer | {ideal_cmp:.4f} |",
        f"| ideal `mp` step: T(B) + optimizer / 2 | {ideal_mp:.4f} |",
        f"| ideal `cmp` / `mp` | {ideal_mp / ideal_cmp:.2f} |",
    ]
    return "\n".join(lines)


def raw_table(record: dict[str, Any]) -> str:
    """Every raw row: samples/s with its spread, against mp, against the ideal (alone and co-run), memory, idle."""
    rows = record["rows"]
    mp = next((r["samples_per_s"] for r in rows if r["method"] == "mp" and "samples_per_s" in r), None)
    lines = [
        "| method | workers | samples/s (min–max) | × mp | ÷ ideal | ÷ co-run ideal | peak RSS MiB per worker "
        "| idle fraction per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['workers']} | skipped: {r['error']} | | | | | |")
            continue
        idle = "n/a" if not r.get("idle_fraction") else " / ".join(f"{v:.2f}" for v in r["idle_fraction"])
        rss = " / ".join(f"{v:.0f}" for v in r["peak_rss_mib"])
        lines.append(
            f"| {r['label']} | {r['workers']} | {r['samples_per_s']:.1f}{_spread(r.get('samples_per_s_repeats'))} "
            f"| {_ratio(r['samples_per_s'] / mp if mp else None)} | {_ratio(r.get('of_ideal'))} "
            f"| {_ratio(r.get('of_corun_ideal'))} | {rss} | {idle} |"
        )
    return "\n".join(lines)


def best_table(record: dict[str, Any]) -> str:
    """Each family at its best setting, and how `cmp` compares with it."""
    rates = {r["method"]: r["samples_per_s"] for r in record["rows"] if "samples_per_s" in r}
    cmp = rates.get("cmp")
    lines = ["| family | best setting | samples/s | `cmp` ÷ it |", "|---|---|---|---|"]
    for family, best in record["best_of"].items():
        ratio = _ratio(cmp / best["samples_per_s"] if cmp else None)
        lines.append(f"| {family} | {best['label']} | {best['samples_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def breakdown_table(record: dict[str, Any]) -> str:
    """Where each worker's step goes under our schedules (median seconds per step), next to the ideal compute."""
    found = [r for r in record["rows"] if r.get("breakdown_s") and r["method"] in ("cmp", "cmp_gloo", "mp")]
    if not found:
        return ""
    head = [f"{r['method']} rank {rank}" for r in found for rank in range(len(r["breakdown_s"]))]
    lines = ["| ms per step | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for part in BREAKDOWN:
        cells = [f"{1000 * ranks[part]:.1f}" for r in found for ranks in r["breakdown_s"]]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    totals = [f"**{1000 * r['step_s']:.1f}**" for r in found for _ in r["breakdown_s"]]
    lines.append("| **step (median)** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def trainer_table(record: dict[str, Any]) -> str:
    """The Trainer-level rows: samples/s, against mp and the ideal, and where Lightning's step goes."""
    rows = record.get("trainer") or []
    if not rows:
        return ""
    mp = next((r.get("samples_per_s") for r in rows if r["method"] == "mp"), None)
    parts = ("training_step", "backward", "optimizer", "other")
    lines = [
        "| through `L.Trainer` | samples/s (min–max) | × mp | ÷ ideal | ÷ co-run ideal | "
        + " | ".join(f"{p} ms" for p in parts)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(parts),
    ]
    for r in rows:
        if "samples_per_s" not in r:
            lines.append(f"| {r['method']} | skipped: {r.get('error', '')} |" + " |" * (4 + len(parts)))
            continue
        got = r.get("parts") or {}
        cells = [f"{1000 * got[p]:.1f}" if got.get(p) is not None else "" for p in parts]
        lines.append(
            f"| {r.get('label', r['method'])} | {r['samples_per_s']:.1f}{_spread(r.get('samples_per_s_repeats'))} "
            f"| {_ratio(r['samples_per_s'] / mp if mp else None)} | {_ratio(r.get('of_ideal'))} "
            f"| {_ratio(r.get('of_corun_ideal'))} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def error_table(record: dict[str, Any]) -> str:
    """The projection at K = 2…8, and its error (predicted ÷ measured) where the schedule ran."""
    measured = {r["method"]: r["step_s"] for r in record["rows"] if "step_s" in r}
    predicted = {n: {int(k): v for k, v in per.items()} for n, per in record["projection_s_per_step"].items()}
    table = projection_table(predicted, measured, 2).splitlines()
    table[0] += " predicted ÷ measured |"
    table[1] += "---|"
    before = record.get("projection_error_uncalibrated")
    if before:
        table[0] += " the same uncalibrated |"
        table[1] += "---|"
    for i, name in enumerate(predicted, start=2):
        table[i] += f" {_ratio(record.get('projection_error', {}).get(name))} |"
        if before:
            table[i] += f" {_ratio(before.get(name))} |"
    return "\n".join(table)


def tables(record: dict[str, Any]) -> str:
    """Every table of one run, in the order the docs show them (Markdown)."""
    c = record["config"]
    cuts = record["cuts"].get("cmp") or record["cuts"].get("mp")
    parts = [
        f"**{c['model']}, global batch {c['batch_size']}, {c['size']}×{c['size']}**, 2-stage cut {cuts}; "
        f"{record['machine'].get('processor', '')}, {record['machine'].get('cpus')} CPUs; "
        f"JSON written by `{record['command']}`.",
        profile_table(record),
        raw_table(record),
        best_table(record),
        breakdown_table(record),
        trainer_table(record),
        error_table(record),
    ]
    return "\n\n".join(p for p in parts if p)


def tables_from_json(path: str | Path) -> str:
    """`tables` of a saved record (what the docs' ``<!-- bench json=... -->`` marker expands to)."""
    return tables(json.loads(Path(path).read_text()))


def plot_throughput(record: dict[str, Any], path: Path) -> Path:
    """The throughput bars of one run (methods that could not run left out)."""
    c = record["config"]
    title = f"{c['model']}, batch {c['batch_size']}, {c.get('size', 32)}x{c.get('size', 32)}, 2 CPU workers x 1 thread"
    return bar_chart([r for r in record["rows"] if r["method"] in METHODS], path, title)


def plot_timeline(record: dict[str, Any], path: Path) -> Path:
    """One ``mp`` and one ``cmp`` step per rank (`plot_timelines`)."""
    return plot_timelines(record["timelines"], path)


def plot_record(record: dict[str, Any], out: Path) -> list[Path]:
    """``throughput.png`` and (when recorded) ``timeline.png`` in ``out``."""
    paths = [plot_throughput(record, out / "throughput.png")]
    if record.get("timelines"):
        paths.append(plot_timeline(record, out / "timeline.png"))
    return paths


def _rate(rows: list[dict[str, Any]], method: str) -> float | None:
    return next((r["samples_per_s"] for r in rows if r["method"] == method and "samples_per_s" in r), None)


def _of(rows: list[dict[str, Any]], method: str, key: str) -> float | None:
    return next((r.get(key) for r in rows if r["method"] == method and "samples_per_s" in r), None)


def _div(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def overview(paths: list[str | Path]) -> str:
    """One column per saved run: where `cmp` stands against its ideal and the other methods (Markdown)."""
    records = [json.loads(Path(p).read_text()) for p in paths]
    head = [
        f"{r['config']['model']}, {r['config']['size']}², batch {r['config']['batch_size']} (`{Path(p).stem}`)"
        for r, p in zip(records, paths, strict=True)
    ]
    lines = ["| | " + " | ".join(head) + " |", "|---|" + "---|" * len(records)]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in records) + " |")

    def best(r: dict[str, Any], family: str) -> float | None:
        return r["best_of"].get(family, {}).get("samples_per_s")

    def best_torch(r: dict[str, Any]) -> tuple[float | None, str]:
        found = [(v["samples_per_s"], v["label"]) for f, v in r["best_of"].items() if f.startswith("torch pipelining")]
        return max(found) if found else (None, "")

    row("half-batch efficiency T(B) / (2 T(B/2))", lambda r: f"{r['compute_profile']['half_batch_efficiency']:.2f}")
    row("co-run factor", lambda r: f"{r['compute_profile']['corun_factor']:.2f}")
    row("`cmp` ÷ ideal, raw", lambda r: _ratio(_of(r["rows"], "cmp", "of_ideal")))
    row("`cmp` ÷ co-run ideal, raw", lambda r: _ratio(_of(r["rows"], "cmp", "of_corun_ideal")))
    row("`cmp` ÷ ideal, Trainer", lambda r: _ratio(_of(r.get("trainer") or [], "cmp", "of_ideal")))
    row("`cmp` ÷ co-run ideal, Trainer", lambda r: _ratio(_of(r.get("trainer") or [], "cmp", "of_corun_ideal")))
    row("ideal `cmp` / `mp`", lambda r: _ideal_ratio(r))
    row("`cmp` / `mp`, raw", lambda r: _div(_rate(r["rows"], "cmp"), _rate(r["rows"], "mp")))
    row(
        "`cmp` / `mp`, Trainer",
        lambda r: _div(_rate(r.get("trainer") or [], "cmp"), _rate(r.get("trainer") or [], "mp")),
    )
    row("`cmp` / DDP (best bucket), raw", lambda r: _div(_rate(r["rows"], "cmp"), best(r, "torch DDP")))
    row(
        "`cmp` / Lightning ddp, Trainer",
        lambda r: _div(_rate(r.get("trainer") or [], "cmp"), _rate(r.get("trainer") or [], "ddp")),
    )
    row(
        "`cmp` / best torch pipelining",
        lambda r: (
            _div(_rate(r["rows"], "cmp"), best_torch(r)[0]) + f" ({best_torch(r)[1].removeprefix('torch pipelining ')})"
        ),
    )
    row("`cmp` / our best gpipe", lambda r: _div(_rate(r["rows"], "cmp"), best(r, "lightning_cmp gpipe")))
    row(
        "`cmp` over gloo / `cmp` (shared memory), raw",
        lambda r: _div(_rate(r["rows"], "cmp_gloo"), _rate(r["rows"], "cmp")),
    )
    row("single device 2 threads / `cmp`, raw", lambda r: _div(_rate(r["rows"], "single2"), _rate(r["rows"], "cmp")))
    row(
        "projection error (predicted ÷ measured): `mp`, `cmp`",
        lambda r: ", ".join(_ratio(r["projection_error"].get(n)) for n in ("mp", "cmp")),
    )
    return "\n".join(lines)


def _ideal_ratio(record: dict[str, Any]) -> str:
    p, b = record["compute_profile"], record["config"]["batch_size"]
    return _div(ideal_step("mp", p, b), ideal_step("cmp", p, b))
