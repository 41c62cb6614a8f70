"""Bi-Partition against layer-wise cuts: each worker's measured load, and the step time the simulator predicts.

``python -m lightning_cmp.bench.bipartition --out docs/bench/bipartition.json`` prints the tables and writes the
JSON the docs' tables and the two figures (``docs/img/bipartition_*.png``, ``--plot-only`` redraws them from the
JSON alone) are made from.

**Measured** (one process, one thread, one batch): every block's forward and backward seconds
(`profile_blocks`), and what a block costs when it is split (`profile_replay`: seconds to replay its forward
from a recording, bytes of the recording, bytes of its weights), then one gloo message's seconds per byte
between two processes (the slope of `project.send_seconds` between a 64 KiB and a 16 MiB ping-pong). These
give the `BlockCosts` the runtime's solver uses (`measured_costs`): a split block charges its backward worker
the replay, receiving the recording and sending the updated weights back. Defaults: torchvision VGG-16 and
ResNet-50 at 64x64 inputs, batch 8, and the benchmark's VGG-style model (`models.build("vgg")`) at 32x32,
batch 64; torchvision models as the sweep builds them (`zoo.build`) but with BatchNorm in training mode.
``--all-torchvision`` adds every CNN classifier of ``docs/bench/torchvision_sweep.json`` at the input size the
sweep used (transformers, ViT/Swin/MaxViT, left out).

**Derived, not measured**: per K = 2..8 each worker's load (forward of its forward range, backward of its
backward range, split-block charges; `bipartition_loads`) under ``uniform`` and ``balanced`` (layer-wise
min-max of forward + backward) cuts and under Bi-Partition, both the family the runtime serves
(``forward_ahead``: a split block's forward runs on the earlier worker) and, for reference, the unrestricted
one; imbalance is the slowest load over the mean. Split charges raise the mean, so imbalance can rank the two
Bi-Partition families unlike their slowest workers do (``bottleneck_s``, which never rises from balanced to
forward_ahead to unrestricted). The step time of ``mp``, ``gpipe`` (M=4) and ``cmp`` is
simulated from the per-stage costs of balanced and of Bi-Partition (forward_ahead) cuts, profiled at the whole
batch and **scaled** linearly to each microbatch by the simulator (CPU kernels are less efficient on smaller
batches, the same for both partitions); activation messages, the mirrors' gradient exchange and the optimizer
step are not modelled (the same for both), and the split-block charges count as their backward worker's
forward time (`bipartition_pass_costs`: the runtime replays a split block during the forward). This is the
simulation the strategy runs to decide whether ``partition="bipartition"`` keeps separate cuts.

**Measured speed-up** (``--measure vgg16:2 bench_vgg:3``): the profiled models train through this package's
runtime on K gloo processes (one thread each) with ``mp`` and ``gpipe`` (M=4), once with the balanced cuts and
once with the Bi-Partition cuts of the JSON; the measured gain (balanced / bipartition seconds per step,
medians of ``--repeats`` runs) is written next to the simulated one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_cmp.partition import (
    BlockCosts,
    balanced_cuts,
    bipartition_cuts,
    bipartition_loads,
    bipartition_pass_costs,
    imbalance,
    measured_costs,
    profile_blocks,
    trace_chain,
    uniform_cuts,
)
from lightning_cmp.schedule import get_schedule

__all__ = [
    "POLICIES", "SIMULATED", "main", "model_report", "most_gained", "partitions", "plot", "plot_cuts", "plot_imbalance",
    "split_blocks", "summarize", "sweep_table", "tables", "tables_from_json",
]  # fmt: skip

POLICIES = ("uniform", "balanced", "bipartition", "bipartition_unrestricted")
#: (name in the report, registered schedule, microbatches)
SIMULATED = (("mp", "mp", 1), ("gpipe4", "gpipe", 4), ("cmp", "cmp", 1))
DEFAULT_MODELS = ("vgg16", "resnet50", "bench_vgg")
TRANSFORMERS = ("vit_", "swin", "maxvit")
SWEEP_JSON = Path("docs/bench/torchvision_sweep.json")


def _cut_record(costs: BlockCosts, forward: list[int], backward: list[int]) -> dict[str, Any]:
    loads = bipartition_loads(costs, forward, backward)
    return {
        "forward_cuts": forward, "backward_cuts": backward, "loads_s": loads, "bottleneck_s": max(loads),
        "imbalance": imbalance(loads),
    }  # fmt: skip


def split_blocks(forward: Sequence[int], backward: Sequence[int]) -> list[int]:
    """Blocks whose forward and backward run on different workers.

    Examples:
        >>> split_blocks([3, 5], [2, 5])
        [2]
    """
    return [b for f, w in zip(forward, backward, strict=True) for b in range(min(f, w), max(f, w))]


def worker_of(cuts: Sequence[int], block: int) -> int:
    """The worker running ``block`` under ``cuts``.

    Examples:
        >>> [worker_of([2, 5], b) for b in range(6)]
        [0, 0, 1, 1, 1, 2]
    """
    return sum(block >= c for c in cuts)


def partitions(
    costs: BlockCosts, k: int, replays: Sequence[Sequence[float]], forbidden: Mapping[int, str] | None = None
) -> dict[str, Any]:
    """The four policies' cuts, loads and imbalance at ``k`` workers; for Bi-Partition also its split blocks and
    what they cost each backward worker per step (recorded and weight bytes, replay seconds).

    Examples:
        >>> costs = BlockCosts(forward=[1, 1, 1], backward=[2, 2, 2], move=[0] * 3, weight_sync=[0] * 3)
        >>> row = partitions(costs, 2, [(0.0, 0, 0)] * 3)
        >>> row["balanced"]["imbalance"], row["bipartition"]["imbalance"], row["bipartition"]["split_blocks"]
        (1.3333333333333333, 1.1111111111111112, [1])
    """
    whole = [f + b for f, b in zip(costs.forward, costs.backward, strict=True)]
    layered = {"uniform": uniform_cuts(costs.num_blocks, k, forbidden), "balanced": balanced_cuts(whole, k, forbidden)}
    row = {name: _cut_record(costs, cuts, cuts) for name, cuts in layered.items()}
    for name, ahead in (("bipartition", True), ("bipartition_unrestricted", False)):
        forward, backward = bipartition_cuts(costs, k, forbidden, forward_ahead=ahead)
        split = split_blocks(forward, backward)
        workers = [{"recorded_bytes": 0, "weight_bytes": 0, "replay_s": 0.0} for _ in range(k)]
        for block in split:
            owner = workers[worker_of(backward, block)]
            seconds, recorded, weights = replays[block]
            owner["recorded_bytes"] += int(recorded)
            owner["weight_bytes"] += int(weights)
            owner["replay_s"] += float(seconds)
        row[name] = {**_cut_record(costs, forward, backward), "split_blocks": split, "per_worker": workers}
    return row


def simulations(costs: BlockCosts, row: Mapping[str, Any]) -> dict[str, Any]:
    """Per simulated schedule: the step time under balanced and Bi-Partition cuts, and balanced / bipartition."""
    out: dict[str, Any] = {}
    for name, schedule, m in SIMULATED:
        steps = {}
        for policy in ("balanced", "bipartition"):
            cuts = row[policy]["forward_cuts"], row[policy]["backward_cuts"]
            steps[policy] = get_schedule(schedule).simulate(m, bipartition_pass_costs(costs, *cuts)).makespan
        out[name] = {**steps, "gain": steps["balanced"] / steps["bipartition"]}
    return out


def ratios(passes: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Backward over forward seconds per block (blocks without a timed forward left out), and over the chain.

    Examples:
        >>> ratios([(1.0, 2.0), (1.0, 3.0), (0.0, 0.0)])["median"], ratios([(1.0, 2.0), (1.0, 3.0)])["whole"]
        (2.5, 2.5)
    """
    per_block = [b / f for f, b in passes if f > 0]
    total = sum(b for _, b in passes) / max(sum(f for f, _ in passes), 1e-30)
    return {"per_block": per_block, "median": statistics.median(per_block), "min": min(per_block),
            "max": max(per_block), "whole": total}  # fmt: skip


def model_report(
    net: nn.Module, x: torch.Tensor, seconds_per_byte: float, ks: Sequence[int], repeats: int = 3
) -> dict[str, Any]:
    """Profile ``net`` on the batch ``x`` (current thread count) and derive every K's partitions and steps."""
    from lightning_cmp.runtime.replay import profile_replay  # the runtime layer, only when measuring

    chain = trace_chain(net)
    started = time.perf_counter()
    passes = profile_blocks(chain, x, repeats)
    replays = profile_replay(chain, x, repeats)
    profiled = time.perf_counter() - started
    costs = measured_costs(passes, replays, seconds_per_byte)
    forbidden = chain.forbidden_cuts()
    allowed = chain.num_blocks - len(forbidden)
    rows: dict[str, Any] = {}
    for k in ks:
        if k > allowed:
            break
        row = partitions(costs, k, replays, forbidden)
        rows[str(k)] = {**row, "simulated": simulations(costs, row)}
    return {
        "input": list(x.shape), "blocks": chain.num_blocks, "forbidden_cuts": sorted(forbidden),
        "profile_s": profiled, "passes_s": [list(p) for p in passes], "replays": [list(r) for r in replays],
        "extra_s": [costs.extra(b) for b in range(costs.num_blocks)], "bwd_fwd_ratio": ratios(passes), "k": rows,
    }  # fmt: skip


def seconds_per_byte(small: int = 1 << 16, large: int = 1 << 24) -> float:
    """One-way gloo message seconds per byte between two processes: the slope between two ping-pong sizes."""
    from lightning_cmp.bench.project import send_seconds

    t_small, t_large = send_seconds([small, large])
    return max(t_large - t_small, 0.0) / (large - small)


# -- the models -----------------------------------------------------------------------------------------------
def cases(names: Sequence[str], all_torchvision: bool, size: int, batch: int) -> list[dict[str, Any]]:
    """``{"name", "size", "batch_size", "options"}`` per model: ``bench_<name>`` is a benchmark model at 32x32,
    batch 64; every other name a torchvision classifier at ``size``; the sweep's CNNs at the sweep's sizes."""
    out = [
        {"name": n, "size": 32, "batch_size": 64, "options": {}}
        if n.startswith("bench_")
        else {"name": n, "size": size, "batch_size": batch, "options": {}}
        for n in names
    ]
    if all_torchvision:
        from lightning_cmp.bench.torchvision_sweep import FIXES

        seen = {c["name"] for c in out}
        for row in json.loads(SWEEP_JSON.read_text())["rows"]:
            name = row["model"].split(" ")[0]
            if row.get("blocks") is None or name in seen or name.startswith(TRANSFORMERS):
                continue
            seen.add(name)
            out.append({"name": name, "size": row["size"], "batch_size": batch, "options": FIXES.get(name, {})})
    return out


def build_case(case: Mapping[str, Any]) -> nn.Module:
    """The model of one case, random weights (seed 0); torchvision's with BatchNorm in training mode."""
    if case["name"].startswith("bench_"):
        from lightning_cmp.bench.models import build

        return build(case["name"].removeprefix("bench_"))
    from lightning_cmp.bench.zoo import build as build_torchvision

    return build_torchvision(case["name"], case["size"], case["options"], train_batchnorm=True)


# -- measured: the same model trained on K processes with both partitions -------------------------------------
MEASURED = ("mp", "gpipe4")


def measure(
    record: Mapping[str, Any], runs: Mapping[str, Sequence[int]], steps: int, repeats: int
) -> dict[str, dict[str, Any]]:
    """Median seconds per step of ``mp`` and ``gpipe`` (M=4) with the balanced and the Bi-Partition (forward
    ahead) cuts that ``record`` holds, for each model and its Ks in ``runs`` (``{"vgg16": [2]}``): ``repeats``
    launches of each, alternating, on K fresh gloo processes (one thread each) at the batch and input size the
    model was profiled at, with the gain the simulator predicted for the same cuts next to it. Where the two
    partitions' cuts are equal (no split pays off) the pair measures the machine's noise."""
    from lightning_cmp.bench.launch import run_workers
    from lightning_cmp.bench.methods import run_method

    out: dict[str, dict[str, Any]] = {}
    for name, ks in runs.items():
        model = record["models"][name]
        built = name.removeprefix("bench_") if name.startswith("bench_") else f"torchvision:{name}"
        for k in ks:
            row = model["k"][str(k)]
            for method in MEASURED:
                # launches alternate between the two partitions, so drift on a shared machine hits both alike
                times: dict[str, list[float]] = {"balanced": [], "bipartition": []}
                for _ in range(repeats):
                    for policy, runs_s in times.items():
                        forward, backward = row[policy]["forward_cuts"], row[policy]["backward_cuts"]
                        per_rank = run_workers(
                            run_method, k, method=method, model=built, cuts=backward, steps=steps, repeats=1,
                            batch_size=model["batch_size"], size=model["size"], forward_cuts=forward, timeout=900,
                        )  # fmt: skip
                        runs_s.append(max(r["seconds"][0] for r in per_rank) / steps)
                step = {policy: statistics.median(t) for policy, t in times.items()}
                print(f"# {name} K={k} {method}: {step}", file=sys.stderr)
                measured = step["balanced"] / step["bipartition"]
                simulated = row["simulated"][method]["gain"]
                balanced, split = times["balanced"], times["bipartition"]
                out[f"{name}/{k}/{method}"] = {
                    **{policy: {"step_s": step[policy], "runs_s": t} for policy, t in times.items()},
                    "model": name,
                    "k": k,
                    "method": method,
                    "split_blocks": row["bipartition"]["split_blocks"],
                    "gain_measured": measured,
                    "gain_range": [min(balanced) / max(split), max(balanced) / min(split)],
                    "gain_simulated": simulated,
                    "measured_over_simulated": measured / simulated,
                }
    return out


def measured_table(measured: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: measured vs simulated gain of Bi-Partition over balanced cuts."""
    lines = [
        "| model | K | split blocks | schedule | balanced s/step | bipartition s/step | gain measured (range) | "
        "gain simulated | measured / simulated |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in measured.values():
        low, high = row["gain_range"]
        split = ", ".join(map(str, row["split_blocks"])) or "none"
        lines.append(
            f"| {row['model']} | {row['k']} | {split} | {row['method']} | {row['balanced']['step_s']:.4f} | "
            f"{row['bipartition']['step_s']:.4f} "
            f"| {row['gain_measured']:.3f} ({low:.3f}–{high:.3f}) | {row['gain_simulated']:.3f} | "
            f"{row['measured_over_simulated']:.3f} |"
        )
    return "\n".join(lines)


# -- tables and figures (from the JSON alone) -----------------------------------------------------------------
def summarize(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the sweep's table needs, per model and K (``--summary``): imbalance per policy, split blocks and the
    simulated gain per schedule; the per-block measurements are left out (one model's report holds them)."""
    models = {
        name: {
            "blocks": model["blocks"],
            "input": model["input"],
            "bwd_fwd_ratio": model["bwd_fwd_ratio"],
            "k": {
                k: {
                    "imbalance": {policy: row[policy]["imbalance"] for policy in POLICIES},
                    "bottleneck_s": {policy: row[policy]["bottleneck_s"] for policy in POLICIES},
                    "split_blocks": row["bipartition"]["split_blocks"],
                    "gain": {sched: row["simulated"][sched]["gain"] for sched, _, _ in SIMULATED},
                }
                for k, row in model["k"].items()
            },
        }
        for name, model in record["models"].items()
    }
    keep = ("command", "config", "machine", "seconds_per_byte", "skipped")
    return {**{key: record[key] for key in keep}, "summary": True, "models": models}


def sweep_table(summary: Mapping[str, Any], target: float = 1.05, bad: float = 1.15) -> str:
    """Markdown, one row per K over every model of a `summarize`d sweep: how often layer-wise balanced cuts are
    bad (imbalance >= ``bad``) and Bi-Partition brings them to ``target``, median imbalances, and in how many
    cases each schedule simulates faster with the separate cuts (where the strategy keeps them)."""
    ks = sorted({int(k) for model in summary["models"].values() for k in model["k"]})
    sims = [name for name, _, _ in SIMULATED]
    lines = [
        f"| K | models | balanced >= {bad} | of those, bipartition <= {target} | median imbalance balanced → "
        "bipartition | slowest worker gain, max | " + " | ".join(f"{n} faster" for n in sims) + " |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(sims),
    ]
    for k in ks:
        rows = [model["k"][str(k)] for model in summary["models"].values() if str(k) in model["k"]]
        balanced = [r["imbalance"]["balanced"] for r in rows]
        split = [r["imbalance"]["bipartition"] for r in rows]
        worst = [r for r in rows if r["imbalance"]["balanced"] >= bad]
        fixed = [r for r in worst if r["imbalance"]["bipartition"] <= target]
        gain = max(r["bottleneck_s"]["balanced"] / r["bottleneck_s"]["bipartition"] for r in rows)
        faster = [sum(r["gain"][n] > 1.0 for r in rows) for n in sims]
        lines.append(
            f"| {k} | {len(rows)} | {len(worst)} | {len(fixed)} | {statistics.median(balanced):.3f} → "
            f"{statistics.median(split):.3f} | {gain:.3f}x | " + " | ".join(map(str, faster)) + " |"
        )
    return "\n".join(lines)


def tables_from_json(path: str | Path) -> str:
    """The docs' tables, from the JSON `main` wrote (with the measured table when ``--measure`` added one; the
    sweep's table for a ``--summary`` JSON)."""
    record = json.loads(Path(path).read_text())
    if record.get("summary"):
        return sweep_table(record)
    text = tables(record)
    if record.get("measured"):
        text += (
            "\n\nMeasured on this machine (" + record["measured_config"] + "):\n\n" + measured_table(record["measured"])
        )
    return text


def tables(record: Mapping[str, Any]) -> str:
    """Markdown: imbalance per model, K and policy (with split blocks), then the simulated gain of Bi-Partition."""
    head = "| model | K | uniform | balanced | bipartition | bipartition (unrestricted) | slowest worker balanced / "
    head += "bipartition | split blocks | extra MB per step (busiest worker) | bwd/fwd median (whole) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for name, model in record["models"].items():
        ratio = model["bwd_fwd_ratio"]
        for k, row in model["k"].items():
            cells = " | ".join(f"{row[p]['imbalance']:.3f}" for p in POLICIES)
            part = row["bipartition"]
            speedup = row["balanced"]["bottleneck_s"] / part["bottleneck_s"]
            split = ", ".join(map(str, part["split_blocks"])) or "none"
            moved = max(w["recorded_bytes"] + w["weight_bytes"] for w in part["per_worker"]) / 1e6
            lines.append(
                f"| {name} | {k} | {cells} | {speedup:.3f}x | {split} | {moved:.1f} | "
                f"{ratio['median']:.2f} ({ratio['whole']:.2f}) |"
            )
    names = [n for n, _, _ in SIMULATED]
    lines += ["", "| model | K | " + " | ".join(f"{n} balanced → bipartition" for n in names) + " |"]
    lines.append("|---|---:" + "|---:" * len(names) + "|")
    for name, model in record["models"].items():
        for k, row in model["k"].items():
            sim = row["simulated"]
            steps = [f"{sim[n]['balanced']:.3f} → {sim[n]['bipartition']:.3f} s ({sim[n]['gain']:.3f}x)" for n in names]
            lines.append(f"| {name} | {k} | " + " | ".join(steps) + " |")
    return "\n".join(lines)


def plot(record: Mapping[str, Any], imbalance_png: Path, cuts_png: Path, cuts_model: str = "vgg16", k: int = 4) -> None:
    """Both figures: `plot_imbalance` and `plot_cuts`."""
    plot_imbalance(record, imbalance_png)
    plot_cuts(record, cuts_png, cuts_model, k)


def plot_imbalance(record: Mapping[str, Any], path: Path) -> Path:
    """Imbalance vs K per model, for the three policies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = record["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.2), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        ks = [int(k) for k in model["k"]]
        for policy, style in (("uniform", ":o"), ("balanced", "-s"), ("bipartition", "-^")):
            ax.plot(ks, [row[policy]["imbalance"] for row in model["k"].values()], style, label=policy)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_title(f"{name} ({model['blocks']} blocks)", fontsize=10)
        ax.set_xlabel("K (workers)")
    axes[0][0].set_ylabel("slowest load / mean")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_cuts(record: Mapping[str, Any], path: Path, model: str = "vgg16", k: int = 4) -> Path:
    """The forward and backward cuts of ``model`` (the first model if the record lacks it) at ``k``, with a second
    panel for the case Bi-Partition helps most, when that is another one."""
    import matplotlib

    matplotlib.use("Agg")
    _plot_cuts(record, path, model if model in record["models"] else next(iter(record["models"])), k)
    return path


def most_gained(record: Mapping[str, Any]) -> tuple[str, int]:
    """The model and K where Bi-Partition's slowest worker gains most over balanced cuts.

    Examples:
        >>> row = lambda bal, bip: {"balanced": {"bottleneck_s": bal}, "bipartition": {"bottleneck_s": bip}}
        >>> most_gained({"models": {"a": {"k": {"2": row(2.0, 1.5), "3": row(2.0, 1.9)}}}})
        ('a', 2)
    """
    gains = {
        (name, int(k)): row["balanced"]["bottleneck_s"] / row["bipartition"]["bottleneck_s"]
        for name, model in record["models"].items()
        for k, row in model["k"].items()
    }
    return max(gains, key=lambda key: gains[key])


def _plot_cuts(record: Mapping[str, Any], path: Path, name: str, k: int) -> None:
    """Forward and backward row per panel: ``name`` at ``k``, and the case Bi-Partition helps most (`most_gained`)."""
    import matplotlib.pyplot as plt

    panels = [(name, min(k, max(int(kk) for kk in record["models"][name]["k"])))]
    if most_gained(record) != panels[0]:
        panels.append(most_gained(record))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.4 * len(panels)), squeeze=False)
    for ax, (model_name, kk) in zip(axes[:, 0], panels, strict=True):
        _cuts_panel(ax, record["models"][model_name], model_name, kk)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _cuts_panel(ax: Any, model: Mapping[str, Any], name: str, k: int) -> None:
    import matplotlib.pyplot as plt

    row = model["k"][str(k)]["bipartition"]
    widths = [f + b for f, b in model["passes_s"]]  # both rows: a block's whole cost, so blocks line up
    starts = [0.0, *(sum(widths[: i + 1]) for i in range(len(widths)))]
    colors = plt.get_cmap("tab10")
    for y, cuts in ((1, row["forward_cuts"]), (0, row["backward_cuts"])):
        for block, width in enumerate(widths):
            hatch = "//" if block in row["split_blocks"] else None
            ax.barh(y, width, left=starts[block], height=0.7, color=colors(worker_of(cuts, block)),
                    edgecolor="black", lw=0.4, hatch=hatch)  # fmt: skip
    bounds = pairwise([0, *row["backward_cuts"], len(widths)])
    for w, (load, (a, b)) in enumerate(zip(row["loads_s"], bounds, strict=True)):
        ax.text((starts[a] + starts[b]) / 2, -0.55, f"w{w}: {load:.2f} s", ha="center", fontsize=8)
    ax.set_yticks([1, 0], ["forward", "backward"])
    ax.set_ylim(-0.8, 1.5)
    ax.set_xlabel("cumulative forward + backward seconds (bar width: one block's cost); w: worker load")
    what = f"split blocks {row['split_blocks']} hatched" if row["split_blocks"] else "no block split"
    ax.set_title(f"{name}, K={k}: Bi-Partition (forward ahead), {what}; colour = worker", fontsize=10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.bipartition", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="torchvision names or bench_<name>")
    p.add_argument("--all-torchvision", action="store_true", help="add every CNN of the torchvision sweep")
    p.add_argument("--size", type=int, default=64, help="input size of the named torchvision models")
    p.add_argument("--batch-size", type=int, default=8, help="batch of the torchvision models")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ks", type=int, nargs="+", default=list(range(2, 9)))
    p.add_argument("--seconds-per-byte", type=float, default=None, help="skip the ping-pong measurement")
    p.add_argument("--out", type=Path, default=Path("docs/bench/bipartition.json"))
    p.add_argument("--img", type=Path, default=Path("docs/img"))
    p.add_argument("--plot-only", action="store_true", help="redraw the figures from --out")
    p.add_argument("--summary", action="store_true", help="write only the sweep's summary (no figures)")
    p.add_argument(
        "--measure",
        metavar="MODEL:K,K",
        nargs="+",
        help="instead of profiling: train these models of --out (e.g. vgg16:2 bench_vgg:3) with both partitions "
        "(mp, gpipe M=4) on K processes and add the measured step times to --out",
    )
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    pngs = args.img / "bipartition_imbalance.png", args.img / "bipartition_cuts.png"
    if args.plot_only:
        plot(json.loads(args.out.read_text()), *pngs)
        return
    if args.measure:
        from lightning_cmp.bench.report import write_json as write

        saved = json.loads(args.out.read_text())
        runs = {m.split(":")[0]: [int(k) for k in m.split(":")[1].split(",")] for m in args.measure}
        saved["measured"] = measure(saved, runs, args.steps, args.repeats)
        saved["measured_config"] = (
            f"median of {args.repeats} launches of {args.steps} steps (alternating between the partitions) on K "
            "processes, gloo, 1 thread per process, the batch and input size each model was profiled at; range: "
            "from the slowest/fastest pair of runs; no split blocks: the same cuts twice (the noise)"
        )
        write(saved, args.out)
        print(measured_table(saved["measured"]))
        return
    from lightning_cmp.bench.machine import machine
    from lightning_cmp.bench.report import write_json

    torch.set_num_threads(1)
    per_byte = args.seconds_per_byte if args.seconds_per_byte is not None else seconds_per_byte()
    models: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for case in cases(args.models, args.all_torchvision, args.size, args.batch_size):
        started = time.perf_counter()
        try:
            x = torch.randn(
                case["batch_size"], 3, case["size"], case["size"], generator=torch.Generator().manual_seed(1)
            )
            models[case["name"]] = {**case, **model_report(build_case(case), x, per_byte, args.ks, args.repeats)}
        except Exception as err:  # reported, not fatal: one model that cannot be traced does not stop the sweep
            skipped[case["name"]] = str(err).strip().splitlines()[-1][:160]
            print(f"# {case['name']}: skipped: {skipped[case['name']]}", file=sys.stderr)
            continue
        print(f"# {case['name']}: {time.perf_counter() - started:.1f}s", file=sys.stderr)
    record = {
        "command": "python -m lightning_cmp.bench.bipartition " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine(),
        "seconds_per_byte": per_byte,
        "models": models,
        "skipped": skipped,
    }
    if args.summary:
        write_json(summarize(record), args.out)
        print(sweep_table(summarize(record)))
        return
    write_json(record, args.out)
    plot(record, *pngs)
    print(tables(record))


if __name__ == "__main__":
    main()
