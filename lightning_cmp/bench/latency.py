"""What one meeting point costs on this machine: a message each way between two workers, by how it is sent.

    python -m lightning_cmp.bench.latency --out docs/bench/latency.json   # about a minute here

Two gloo workers (1 thread each, as the benchmarks run them) compute a little, a different amount each time
(as two pipeline workers arrive at a meeting point a little apart), then exchange one tensor each way. The
figure is the time from the later of the two sends until a worker holds its peer's tensor: the cost of the
meeting itself, without the waiting for the slower worker. Modes, interleaved round by round:

- ``header``: `Comm.send` / `Comm.recv`, what the executor's activation and gradient messages use (a shape
  header, then the payload, received one after the other);
- ``known_shape``: the payload only, the receiver knowing its shape (`Comm.isend_into_place` / `irecv_into`);
- ``pre_posted``: the same, with the receive posted before the compute;
- ``broadcast``: `Comm.broadcast` from the first worker (header, then payload), what ``OUTPUT`` uses.

The table gives the median and the 90th percentile over both workers' samples.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MODES", "exchange", "main", "table"]

MODES: dict[str, str] = {
    "header": "shape header, then payload (`Comm.send` / `recv`: activations, gradients)",
    "known_shape": "payload only, shape known to the receiver",
    "pre_posted": "payload only, receive posted before the compute",
    "broadcast": "`Comm.broadcast` from one worker, header then payload (`OUTPUT`)",
}


def exchange(rank: int, world: int, sizes: Sequence[int], rounds: int, per_round: int) -> dict[str, list[float]]:
    """One worker's part (run by `lightning_cmp.bench.launch.run_workers` on 2 processes): per ``"mode bytes"``,
    the seconds from the later of the two sends until this worker held its peer's tensor."""
    import torch
    import torch.distributed as dist

    from lightning_cmp.runtime.comm import Comm

    comm = Comm.world(rank, torch.device("cpu"))
    peer, tag = 1 - rank, 7
    work = torch.randn(256, 256)
    samples: dict[str, list[float]] = {}
    for size in sizes:
        payload = torch.full((max(size // 4, 1),), float(rank))
        for _ in range(rounds):
            for mode in MODES:
                for i in range(per_round):
                    comm.barrier()
                    out = torch.empty_like(payload)
                    posted = comm.irecv_into([out], peer, tag) if mode == "pre_posted" else None
                    for _ in range(2 + (i + rank) % 3):  # the two workers arrive 0-2 products apart
                        work @ work
                    start = time.perf_counter()
                    if mode == "header":
                        comm.send(payload, peer, tag)
                        out = comm.recv(peer, tag)
                    elif mode == "broadcast":
                        out = comm.broadcast(payload if rank == 0 else None, 0)
                    else:
                        comm.isend_into_place([payload], peer, tag)
                        comm.wait(posted or comm.irecv_into([out], peer, tag), peer)
                    done = time.perf_counter()
                    comm.wait_sends()
                    if mode != "broadcast" and out[0].item() != float(peer):
                        raise AssertionError(f"{mode}: received {out[0].item()}, expected {float(peer)}")
                    both = comm.all_gather(torch.tensor([start], dtype=torch.float64))  # one clock: one machine
                    later = max(float(b.item()) for b in both)
                    samples.setdefault(f"{mode} {size}", []).append(done - later)
    dist.barrier()
    return samples


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(per_rank: Sequence[dict[str, list[float]]], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """One row per (mode, size): median and 90th percentile in milliseconds over both workers' samples.

    Examples:
        >>> rows = summarize([{"header 8": [0.001, 0.003]}, {"header 8": [0.002, 0.004]}], [8])
        >>> rows[0]["mode"], rows[0]["bytes"], rows[0]["median_ms"], rows[0]["p90_ms"], rows[0]["samples"]
        ('header', 8, 2.5, 4.0, 4)
    """
    rows = []
    for size in sizes:
        for mode in MODES:
            values = [v for samples in per_rank for v in samples.get(f"{mode} {size}", [])]
            if values:
                rows.append({
                    "mode": mode,
                    "label": MODES[mode],
                    "bytes": size,
                    "median_ms": round(statistics.median(values) * 1e3, 3),
                    "p90_ms": round(_percentile(values, 0.9) * 1e3, 3),
                    "samples": len(values),
                })  # fmt: skip
    return rows


def table(record: dict[str, Any]) -> str:
    """The Markdown table of a `main` record: one row per mode, median / 90th percentile per message size.

    Examples:
        >>> row = {"mode": "header", "label": "h", "bytes": 1280, "median_ms": 1.5, "p90_ms": 4.0, "samples": 9}
        >>> print(table({"rows": [row]}))
        | ms from the later send to the tensor held | 1280 B: median | 1280 B: p90 |
        |---|---:|---:|
        | `header`: h | 1.50 | 4.00 |
    """
    sizes = sorted({r["bytes"] for r in record["rows"]})
    by = {(r["mode"], r["bytes"]): r for r in record["rows"]}
    head = "| ms from the later send to the tensor held | " + " | ".join(
        f"{_bytes(s)}: median | {_bytes(s)}: p90" for s in sizes
    )
    lines = [head + " |", "|---|" + "---:|---:|" * len(sizes)]
    for mode in dict.fromkeys(r["mode"] for r in record["rows"]):
        label = next(r["label"] for r in record["rows"] if r["mode"] == mode)
        cells = [f"{by[(mode, s)]['median_ms']:.2f} | {by[(mode, s)]['p90_ms']:.2f}" for s in sizes]
        lines.append(f"| `{mode}`: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _bytes(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 and size % (1 << 20) == 0 else f"{size} B"


def main(argv: Sequence[str] | None = None) -> None:
    from lightning_cmp.bench.launch import run_workers
    from lightning_cmp.bench.machine import machine
    from lightning_cmp.bench.report import write_json

    p = argparse.ArgumentParser(prog="python -m lightning_cmp.bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--sizes", type=int, nargs="+", default=[1280, 1 << 20],
                   help="message bytes (default: a 32 x 10 float32 output, and 1 MiB)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=4, help="rounds over the modes, interleaved")
    p.add_argument("--per-round", type=int, default=25, help="exchanges per mode per round")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the workers are stopped")
    p.add_argument("--out", type=Path, default=Path("bench_out/latency.json"))
    args = p.parse_args(argv)
    if min(args.sizes) < 4 or args.rounds < 1 or args.per_round < 1:
        p.error("--sizes must be >= 4 bytes, --rounds and --per-round >= 1")
    before = machine()
    per_rank = run_workers(
        exchange, 2, timeout=args.timeout, sizes=args.sizes, rounds=args.rounds, per_round=args.per_round
    )
    record = {
        "command": "python -m lightning_cmp.bench.latency " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": before,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": summarize(per_rank, args.sizes),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(record, args.out)
    print(table(record))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
