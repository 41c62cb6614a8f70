"""GPU smoke test: the CUDA paths of lightning_cmp on one GPU, in a few minutes; prints a PASS/FAIL/SKIP table.

Run ``python -m lightning_cmp.bench.gpu_smoke --device cuda`` (``scripts/gpu_smoke.sh`` sets up Python first), or
``--device cpu`` to run the very same checks on the CPU. Each check is a small function returning one row
``{check, result, detail}``; an exception fails its own row only. The rows, the versions and the device go to a
JSON file (``--out``; default ``$OUT/gpu_smoke.json`` when ``OUT`` is set, else ``./gpu_smoke.json``), rewritten
after every row, so a crash still leaves the rows before it.

Two workers share the one GPU over gloo (NCCL refuses two ranks on one GPU): everything multi-process runs under
`lightning_cmp.bench.launch.run_workers`, with a hard timeout. The worker scenarios run in one launch; when one of
them raises, dies or hangs, it is failed with the first line of its error and the scenarios after it run in a new
launch, so one failure never hides the rest. A Trainer run needs one GPU per worker, so it is skipped on a machine
with fewer than two GPUs. The exit code is 1 when a row failed, else 0.

Comparisons use full fp32 precision (TF32 off), and the pipelines are held to single-process SGD on the same
batches on the same device within a relative error of 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_cmp.bench.launch import run_workers
from lightning_cmp.bench.models import train_steps

__all__ = ["CHECKS", "SCENARIOS", "main", "run_checks"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
Row = dict[str, str]

WIDTH, HIDDEN, CLASSES, BATCH, STEPS, LR = 32, 64, 10, 8, 2, 0.05
TOLERANCE = 1e-5  # relative, as the CPU tests of single-device equivalence
WORLD = 2


# -- shared helpers ------------------------------------------------------------------------------------------------
def _row(check: str, result: str, detail: str) -> Row:
    return {"check": check, "result": result, "detail": detail}


def _first_line(err: BaseException) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= 400 else text[:397] + "..."


def _device(name: str) -> torch.device:
    """``cuda`` means the first GPU (as the strategy's ``root_device``, an indexed device)."""
    device = torch.device(name)
    return torch.device("cuda", 0) if device.type == "cuda" and device.index is None else device


def _full_precision() -> None:
    """fp32 matrix products and convolutions in full precision, so batch splits change only the rounding."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _layers() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(WIDTH, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, CLASSES),
    )


def _mlp(device: torch.device) -> nn.Sequential:
    """The same initial weights in every process (built on the CPU, then moved)."""
    torch.manual_seed(0)
    return _layers().to(device)


def _batches(device: torch.device, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)) for _ in range(steps)
    ]
    return [(x.to(device), y.to(device)) for x, y in data]


def _optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def _reference(device: torch.device) -> tuple[dict[str, Tensor], list[float]]:
    """Single-process SGD with momentum on the same batches and device: what every pipeline must reproduce."""
    model = _mlp(device)
    losses = train_steps(model, _optimizer(model.parameters()), _batches(device))
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, losses


def _relative_error(state: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    if set(state) != set(ref):
        raise AssertionError(f"state dict keys differ: {sorted(set(state) ^ set(ref))}")
    return max(
        float((state[k].cpu().double() - ref[k].double()).abs().max() / ref[k].double().abs().max().clamp_min(1e-12))
        for k in ref
    )


def _loss_error(losses: Sequence[float], ref: Sequence[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, ref, strict=True))


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _rng_changed(before: list[Tensor], device: torch.device) -> list[str]:
    names = ["CPU", str(device)]
    return [names[i] for i, (a, b) in enumerate(zip(before, _rng_states(device), strict=True)) if not torch.equal(a, b)]


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- single-process checks -------------------------------------------------------------------------------------------
def check_environment(device: torch.device) -> Row:
    """Versions and the device; fails when the device cannot run a tensor operation."""
    facts = [f"torch {torch.__version__}", f"python {platform.python_version()}"]
    facts.append(f"gloo {'yes' if dist.is_gloo_available() else 'NO'}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return _row(
                "environment", FAIL, f"CUDA not available ({', '.join(facts)}, built for CUDA {torch.version.cuda})"
            )
        props = torch.cuda.get_device_properties(device)
        facts += [
            f"CUDA {torch.version.cuda}",
            f"{torch.cuda.device_count()} GPU(s)",
            f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)",
            f"nccl {'.'.join(map(str, torch.cuda.nccl.version())) if dist.is_nccl_available() else 'NO'}",
        ]
    value = float((torch.ones(4, device=device) * 2).sum().item())
    if value != 8.0:
        return _row("environment", FAIL, f"2 * ones(4).sum() gave {value} on {device}; {', '.join(facts)}")
    return _row("environment", PASS, ", ".join(facts))


def check_materialize(device: torch.device) -> Row:
    """A model built on the meta device, materialised on ``device``: reproducible, and stage by stage (in any
    order) equal to whole; whether the values equal the CPU's goes in the detail (a GPU draws from its own
    generator, so they need not)."""
    from lightning_cmp.partition.materialize import materialize

    def meta() -> nn.Sequential:
        with torch.device("meta"):
            return _layers()

    whole, again, staged, on_cpu = meta(), meta(), meta(), meta()
    materialize(whole, device, seed=3)
    materialize(again, device, seed=3)
    names = [n for n, _ in staged.named_parameters()]
    half = len(names) // 2
    materialize(staged, device, seed=3, names=names[half:])  # the second stage first, as another worker would
    materialize(staged, device, seed=3, names=names[:half])
    materialize(on_cpu, "cpu", seed=3)
    ref = whole.state_dict()
    problems = []
    wrong_device = [n for n, t in ref.items() if t.device.type != device.type or t.is_meta]
    if wrong_device:
        problems.append(f"not on {device}: {wrong_device}")
    for label, other in (("a second materialisation", again), ("stage by stage", staged)):
        differ = [n for n, t in other.state_dict().items() if not torch.equal(t, ref[n])]
        if differ:
            problems.append(f"{label} differs in {differ}")
    cpu_state = on_cpu.state_dict()
    cpu_diff = max(float((t.cpu() - cpu_state[n]).abs().max()) for n, t in ref.items())
    same = "equal to" if cpu_diff == 0 else f"differ from (max |diff| {cpu_diff:.2g})"
    note = f"values {same} the CPU's"
    if problems:
        return _row("materialize", FAIL, "; ".join(problems) + f"; {note}")
    return _row("materialize", PASS, f"reproducible, stage by stage == whole on {device}; {note}")


def check_materialize_rng(device: torch.device) -> Row:
    """`materialize` must leave the caller's random streams (CPU and GPU) as they were: they decide dropout outside
    the pipeline, which must draw alike on every worker whatever stages each one materialised."""
    from lightning_cmp.partition.materialize import materialize

    with torch.device("meta"):
        model = _layers()
    torch.manual_seed(1234)
    before = _rng_states(device)
    materialize(model, device, seed=3)
    changed = _rng_changed(before, device)
    if changed:
        return _row(
            "materialize_rng",
            FAIL,
            f"materialize() changed the caller's {' and '.join(changed)} random stream (it seeds with "
            "torch.manual_seed, which reseeds every GPU, inside fork_rng(devices=[]), which restores only the CPU's)",
        )
    return _row("materialize_rng", PASS, f"CPU{' and ' + str(device) if device.type == 'cuda' else ''} streams kept")


def check_stage_copy(device: torch.device) -> Row:
    """A StageCopy (a later stage: input leaf, seeded dropout) forward + backward on ``device`` against plain autograd
    under the same seed; the caller's random streams must be left as they were."""
    from lightning_cmp.runtime.rng import seeded
    from lightning_cmp.runtime.stage import StageActivations, StageCopy

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Dropout(0.25), nn.Linear(HIDDEN, CLASSES)).to(device)
    ref = copy.deepcopy(module)
    x = torch.randn(BATCH, WIDTH, device=device)
    grad_out = torch.randn(BATCH, CLASSES, device=device)
    before = _rng_states(device)
    stage, acts = StageCopy(replica=0, stage=1, module=module), StageActivations()
    out = stage.forward(acts, 0, x, training=True, seed=1234)
    grad_in = stage.backward(acts, 0, grad_out)
    changed = _rng_changed(before, device)
    leaf = x.clone().requires_grad_()
    with seeded(1234, device):
        ref_out = ref(leaf)
    ref_out.backward(grad_out)
    problems = []
    if changed:
        problems.append(f"the {' and '.join(changed)} random stream moved")
    if out.device != x.device or grad_in is None or grad_in.device != x.device:
        problems.append(f"output on {out.device}, input gradient on {None if grad_in is None else grad_in.device}")
    pairs = [("output", out, ref_out), ("input gradient", grad_in, leaf.grad)]
    pairs += [
        (f"grad of {n}", p.grad, q.grad) for (n, p), q in zip(module.named_parameters(), ref.parameters(), strict=True)
    ]
    for label, got, want in pairs:
        if got is None or want is None or not torch.allclose(got, want, rtol=1e-6, atol=1e-7):
            problems.append(f"{label} differs from plain autograd")
    with torch.no_grad():  # dropout stays active (train mode): the seed alone decides the mask
        same = stage.forward(StageActivations(), 0, x, training=False, seed=1234)
        other = stage.forward(StageActivations(), 0, x, training=False, seed=99)
    if not torch.equal(same, out.detach()) or torch.equal(other, out.detach()):
        problems.append("the dropout mask does not follow the seed (same seed: same mask, other seed: another)")
    if problems:
        return _row("stage_copy", FAIL, "; ".join(problems))
    return _row("stage_copy", PASS, f"forward/backward == autograd on {device}; seeded dropout; RNG streams kept")


def check_worker_bytes(device: torch.device) -> Row:
    """`worker_bytes` counts parameters, buffers, gradients and optimizer state held on ``device``; a released
    (meta) tensor counts 0."""
    from lightning_cmp.partition.materialize import release
    from lightning_cmp.runtime.memory import worker_bytes

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES))
    net = net.to(device)
    opt = _optimizer(net.parameters())
    x, y = _batches(device, 1)[0]
    F.cross_entropy(net(x), y).backward()
    opt.step()

    def nbytes(tensors: Any) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    params = nbytes(net.parameters())
    expected = {
        "parameters": params,
        "buffers": nbytes(net.buffers()),
        "gradients": params,
        "optimizer": params,  # one momentum buffer per parameter
    }
    got = worker_bytes([net], [opt]).as_dict()
    problems = [f"{k}: {got[k]} != {v}" for k, v in expected.items() if got[k] != v]
    layer = net[3]
    assert isinstance(layer, nn.Linear)
    last = layer.weight
    release(last)  # as a rank releases a stage it does not run (its optimizer state stays until localised)
    after = worker_bytes([net], [opt]).as_dict()
    freed = last.numel() * 4
    if after["parameters"] != params - freed or after["gradients"] != params - freed:
        problems.append(f"after releasing a {freed}-byte weight: {after}")
    if problems:
        return _row("worker_bytes", FAIL, "; ".join(problems))
    return _row("worker_bytes", PASS, f"{got} on {device}; a released weight counts 0")


def _scaled_step(net: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                 overflow: bool) -> tuple[bool, torch.dtype]:  # fmt: skip
    """One fp16-autocast step through ``scaler``; with ``overflow`` an inf is planted in a gradient. Returns whether
    the weights moved and the dtype of the forward's output."""
    x, y = _batches(device, 1)[0]
    opt.zero_grad()
    with torch.autocast(device.type, dtype=torch.float16):
        out = net(x)
        loss = F.cross_entropy(out, y)
    scaler.scale(loss).backward()
    first = next(net.parameters())
    if overflow:
        assert first.grad is not None
        first.grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in net.parameters()]
    scaler.step(opt)
    scaler.update()
    moved = any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    return moved, out.dtype


def check_fp16_scaler(device: torch.device) -> Row:
    """fp16 autocast + ``torch.amp.GradScaler(device.type)``: a finite step updates the weights and keeps the scale,
    an overflow skips the step and halves the scale."""
    net = _mlp(device)
    opt = _optimizer(net.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    moved, dtype = _scaled_step(net, opt, scaler, device, overflow=False)
    grads = {p.grad.dtype for p in net.parameters() if p.grad is not None}
    finite = all(bool(p.isfinite().all()) for p in net.parameters())
    scale_after_step = scaler.get_scale()
    skipped_moved, _ = _scaled_step(net, opt, scaler, device, overflow=True)
    problems = []
    if dtype != torch.float16:
        problems.append(f"autocast output is {dtype}")
    if grads != {torch.float32}:
        problems.append(f"gradient dtypes {grads}")
    if not moved or not finite:
        problems.append(f"finite step: weights moved={moved}, finite={finite}")
    if scale_after_step != 2.0**16:
        problems.append(f"scale after a finite step {scale_after_step}")
    if skipped_moved or scaler.get_scale() != 2.0**15:
        problems.append(f"overflow step: weights moved={skipped_moved}, scale {scaler.get_scale()} (want 32768)")
    if problems:
        return _row("fp16_scaler", FAIL, "; ".join(problems))
    return _row("fp16_scaler", PASS, f"fp16 autocast on {device}: step taken; overflow skipped, scale 65536 -> 32768")


def check_scaler_agreement(device: torch.device) -> Row:
    """`agree_on_overflow` on a one-rank group: the scaler's per-device overflow flags still decide (no process group
    is needed for one rank), so the patched ``unscale_`` is exercised on ``device``."""
    try:
        from lightning_cmp.runtime.comm import Comm
        from lightning_cmp.runtime.scaler import agree_on_overflow
    except ImportError as err:
        return _row("scaler_agreement", SKIP, f"not available: {_first_line(err)}")
    net = _mlp(device)
    opt = _optimizer(net.parameters())
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    undo = agree_on_overflow(scaler, Comm([0], 0, device))
    try:
        moved, _ = _scaled_step(net, opt, scaler, device, overflow=False)
        skipped_moved, _ = _scaled_step(net, opt, scaler, device, overflow=True)
    finally:
        undo()
    if not moved or skipped_moved or scaler.get_scale() != 2.0**15:
        return _row(
            "scaler_agreement",
            FAIL,
            f"finite step moved={moved}, overflow step moved={skipped_moved}, scale {scaler.get_scale()} (want 32768)",
        )
    return _row(
        "scaler_agreement", PASS, f"agreeing unscale_ on {device}: step taken, overflow skipped and scale halved"
    )


CHECKS: dict[str, Callable[[torch.device], Row]] = {
    "environment": check_environment,
    "materialize": check_materialize,
    "materialize_rng": check_materialize_rng,
    "stage_copy": check_stage_copy,
    "worker_bytes": check_worker_bytes,
    "fp16_scaler": check_fp16_scaler,
    "scaler_agreement": check_scaler_agreement,
}


# -- multi-process scenarios: run inside the workers ------------------------------------------------------------------
Note = Callable[[str], None]
Outcome = tuple[bool, str]


def _collectives(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """What the pipeline asks of the process group besides point-to-point: object and tensor collectives."""
    from lightning_cmp.runtime.comm import Comm

    comm = Comm(list(range(world)), rank, device)
    problems = []
    note("all_gather_object (gather_processes)")
    comm.gather_processes()
    note(f"all_reduce of a {device.type} tensor")
    total = comm.all_reduce_sum(torch.full((4,), float(rank + 1), device=device))
    if total.device != device or total.tolist() != [float(sum(range(1, world + 1)))] * 4:
        problems.append(f"all_reduce gave {total.tolist()} on {total.device}")
    note(f"all_gather of a {device.type} tensor")
    parts = comm.all_gather(torch.arange(3.0, device=device) + 10 * rank)
    if [p.tolist() for p in parts] != [[10.0 * r, 10.0 * r + 1, 10.0 * r + 2] for r in range(world)]:
        problems.append(f"all_gather gave {[p.tolist() for p in parts]}")
    note(f"broadcast of a {device.type} tensor (header + data)")
    sent = torch.arange(6.0, device=device).reshape(2, 3).half()
    got = comm.broadcast(sent if rank == 0 else None, 0)
    if got.device != device or got.dtype != torch.float16 or not torch.equal(got.cpu(), sent.cpu()):
        problems.append(f"broadcast gave {got.dtype} {tuple(got.shape)} on {got.device}")
    note("broadcast_object")
    if comm.broadcast_object({"from": rank}, 0) != {"from": 0}:
        problems.append("broadcast_object")
    comm.barrier()
    detail = f"all_gather_object, all_reduce, all_gather, broadcast (fp16, header first), barrier on {device}"
    return (False, "; ".join(problems)) if problems else (True, detail)


def _point_to_point(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """Comm.send/recv (shape and dtype travel in a header) and exchange_into: how activations, gradients and the
    mirror averages travel between GPUs."""
    from lightning_cmp.runtime.comm import Comm

    comm = Comm(list(range(world)), rank, device)
    problems = []
    note(f"send/recv of a {device.type} float32 tensor, rank 0 -> 1")
    data = torch.arange(12.0, device=device).reshape(3, 4)
    if rank == 0:
        comm.send(data, 1, tag=7)
        comm.wait_sends()
    elif rank == 1:
        got = comm.recv(0, tag=7)
        if got.device != device or not torch.equal(got.cpu(), data.cpu()):
            problems.append(f"recv float32 gave {tuple(got.shape)} on {got.device}")
    note(f"send/recv of a {device.type} float16 tensor, rank 1 -> 0")
    half = torch.linspace(-1, 1, 10, device=device).half()
    if rank == 1:
        comm.send(half, 0, tag=8)
        comm.wait_sends()
    elif rank == 0:
        got = comm.recv(1, tag=8)
        if got.dtype != torch.float16 or not torch.equal(got.cpu(), half.cpu()):
            problems.append(f"recv float16 gave {got.dtype}")
    note(f"exchange_into (isend + irecv) of {device.type} tensors")
    if rank < 2:
        peer = 1 - rank
        mine, out = torch.full((5,), float(rank), device=device), torch.empty(5, device=device)
        comm.wait(comm.exchange_into(mine, out, peer, tag=9), peer)
        if out.tolist() != [float(peer)] * 5:
            problems.append(f"exchange_into received {out.tolist()}")
    comm.barrier()
    detail = f"send/recv float32 and float16, exchange_into on {device}"
    return (False, "; ".join(problems)) if problems else (True, detail)


def _pipeline(comm: Any, device: torch.device, schedule: str, microbatches: int, note: Note, shift: int = 0) -> Outcome:
    from lightning_cmp.partition import trace_chain, uniform_cuts
    from lightning_cmp.runtime import OptimizerLayout, Pipeline

    note("reference: single-process SGD")
    ref_state, ref_losses = _reference(device)
    model = _mlp(device)
    chain = trace_chain(model)
    cuts = uniform_cuts(chain.num_blocks, comm.size) if comm.size > 1 else []
    forward_cuts = [c + shift for c in cuts]  # Bi-Partition: the next stage's first blocks recorded and replayed
    note(f"Pipeline({schedule!r}) set-up")
    # shared_memory=False: the mirrors exchange through the process group, as ranks on GPUs always do.
    pipe = Pipeline(
        chain, cuts, schedule, comm, num_microbatches=microbatches, shared_memory=False, forward_cuts=forward_cuts
    )
    opt = _optimizer(model.parameters())
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    note(f"{STEPS} SGD steps")
    losses = train_steps(pipe, opt, _batches(device))
    note("full_state_dict(dst=None)")
    state = pipe.full_state_dict(dst=None)
    pipe.close()
    assert state is not None
    weights, loss = _relative_error(state, ref_state), _loss_error(losses, ref_losses)
    ok = weights < TOLERANCE and loss < TOLERANCE
    detail = (
        f"K={comm.size}, cuts {cuts} (forward {forward_cuts}), {microbatches} microbatch(es), {STEPS} SGD steps on "
        f"{device}: relative error "
        f"weights {weights:.1e}, losses {loss:.1e} (limit {TOLERANCE:g})"
    )
    return ok, detail


def _pipeline_local(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """``cmp`` on one rank of its own (both copies of the one stage local): the executor, the local averaging and
    the output broadcast on the device, with no point-to-point message."""
    from lightning_cmp.runtime.comm import Comm

    note("new_group per rank")
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in the same order
    return _pipeline(Comm([rank], 0, device, group=groups[rank]), device, "cmp", 1, note)


def _pipeline_cmp(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    from lightning_cmp.runtime.comm import Comm

    return _pipeline(Comm(list(range(world)), rank, device), device, "cmp", 1, note)


def _pipeline_cmp_micro(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """Micro-batched ``cmp``: the interleaved order, each microbatch's loss on the device, the output-gradient check."""
    from lightning_cmp.runtime.comm import Comm

    return _pipeline(Comm(list(range(world)), rank, device), device, "cmp", 2, note)


def _pipeline_gpipe(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    from lightning_cmp.runtime.comm import Comm

    return _pipeline(Comm(list(range(world)), rank, device), device, "gpipe", 2, note)


def _pipeline_bipartition(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """``gpipe`` with a Bi-Partition: a recorded forward sent and replayed on the device, the mirror's weights sent."""
    from lightning_cmp.runtime.comm import Comm

    return _pipeline(Comm(list(range(world)), rank, device), device, "gpipe", 2, note, shift=2)


def _pipeline_spectrain(rank: int, world: int, device: torch.device, note: Note) -> Outcome:
    """SpecTrain's asynchronous pipeline on the device: outputs sent to every rank, predicted weights in a scratch
    copy, the drain. Not single-device SGD, so the check is that every rank computed the same finite losses (each
    step's output reached it) and that every stage's weights moved in every one of the STEPS updates."""
    from lightning_cmp.partition import trace_chain, uniform_cuts
    from lightning_cmp.runtime import AsyncPipeline, OptimizerLayout
    from lightning_cmp.runtime.comm import Comm

    comm = Comm(list(range(world)), rank, device)
    model = _mlp(device)
    chain = trace_chain(model)
    note("AsyncPipeline('spectrain') set-up")
    pipe = AsyncPipeline(chain, uniform_cuts(chain.num_blocks, world), "spectrain", comm)
    opt = _optimizer(model.parameters())
    OptimizerLayout(opt, {id(p): n for n, p in model.named_parameters()}).localize(pipe)
    pipe.attach_optimizer(opt)
    updates = [0]

    def update(batch: int) -> None:
        opt.step()
        opt.zero_grad()
        updates[0] += 1

    note(f"{STEPS} steps and the drain")
    losses = train_steps(pipe, opt, _batches(device))
    pipe.drain(update)
    every = comm.all_gather_object(losses)
    pipe.close()
    same = all(theirs == losses for theirs in every)
    finite = all(math.isfinite(v) for v in losses)
    owed = world - rank - 1
    ok = same and finite and updates[0] == owed
    detail = (
        f"K={world}, {STEPS} steps on {device}: losses {'equal on every rank' if same else 'DIFFER between ranks'}"
        f"{'' if finite else ', NOT FINITE'}, rank {rank} drained {updates[0]} update(s) (expected {owed})"
    )
    return ok, detail


SCENARIOS: dict[str, Callable[[int, int, torch.device, Note], Outcome]] = {
    "gloo_collectives": _collectives,
    "gloo_point_to_point": _point_to_point,
    "pipeline_cmp_k1": _pipeline_local,
    "pipeline_cmp_k2": _pipeline_cmp,
    "pipeline_cmp_micro_k2": _pipeline_cmp_micro,
    "pipeline_gpipe_k2": _pipeline_gpipe,
    "pipeline_bipartition_k2": _pipeline_bipartition,
    "pipeline_spectrain_k2": _pipeline_spectrain,
}


def _worker(rank: int, world: int, scenarios: list[str], device: str, progress: str) -> dict[str, Any]:
    """Run ``scenarios`` in order on this rank, recording each one's outcome (and the operation under way) in
    ``progress``/rank<N>.json, so the parent knows where a crash or a hang happened."""
    _full_precision()
    dev = _device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # both ranks share the one GPU
    path = Path(progress) / f"rank{rank}.json"
    state: dict[str, Any] = {"rank": rank, "scenario": None, "op": None, "done": {}}

    def note(op: str) -> None:
        state["op"] = op
        _write_json(path, state)

    for name in scenarios:
        state["scenario"] = name
        note("start")
        try:
            ok, detail = SCENARIOS[name](rank, world, dev, note)
        except BaseException as err:
            state["done"][name] = {"ok": False, "raised": True, "detail": f"{_first_line(err)} (in {state['op']})"}
            _write_json(path, state)
            raise
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        state["done"][name] = {"ok": ok, "detail": detail}
        state["scenario"], state["op"] = None, None
        _write_json(path, state)
    return state["done"]


def _scenario_rows(names: list[str], device: torch.device, timeout: float, deadline: float) -> Iterator[Row]:
    """One launch for all ``names``; after a failure, a new launch for the scenarios after the failed one."""
    remaining = list(names)
    while remaining:
        left = deadline - time.monotonic()
        if left < 15:
            yield from (_row(n, SKIP, "not run: the smoke test's time budget (--budget) is spent") for n in remaining)
            return
        error: BaseException | None = None
        with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as tmp:
            try:
                run_workers(_worker, WORLD, min(timeout, left), scenarios=remaining, device=str(device), progress=tmp)
            except Exception as err:
                error = err
            progress = [_read_json(Path(tmp) / f"rank{r}.json") or {"done": {}} for r in range(WORLD)]
        while remaining:
            name = remaining[0]
            outcomes = [p["done"].get(name) for p in progress]
            if all(o is not None and not o.get("raised") for o in outcomes):
                bad = [f"rank {r}: {o['detail']}" for r, o in enumerate(outcomes) if not o["ok"]]
                yield _row(name, FAIL, "; ".join(bad)) if bad else _row(name, PASS, outcomes[0]["detail"])
                remaining.pop(0)
                continue
            yield _row(name, FAIL, _broken(name, progress, error))
            remaining.pop(0)
            break  # the launch ended in this scenario: the rest run in a new one
        if error is None and remaining:  # cannot happen: every rank finished every scenario
            yield from (_row(n, FAIL, "not reported by the workers") for n in remaining)
            return


def _broken(name: str, progress: list[dict[str, Any]], error: BaseException | None) -> str:
    """Why the launch ended in scenario ``name``: the ranks' own errors and a death or timeout, else where each
    rank was."""
    raised = [
        f"rank {r}: {p['done'][name]['detail']}"
        for r, p in enumerate(progress)
        if p["done"].get(name, {}).get("raised")
    ]
    launch = _launch_error(error) if error is not None else "no error"
    if raised:  # a rank that died or hung says nothing itself: the launch's error names it
        died = error is not None and not str(error).startswith("worker failed")
        return "; ".join([*raised, launch] if died else raised)
    where = [f"rank {r} in {p.get('op')!r}" for r, p in enumerate(progress) if p.get("scenario") == name]
    return f"{launch}{'; ' + ', '.join(where) if where else ''}"


def _launch_error(err: BaseException) -> str:
    """The first line of a launch's error; for a worker's error (run_workers: "worker failed" and each failed
    rank's traceback), each rank's last traceback line, which names the exception."""
    text = str(err)
    if not text.startswith("worker failed"):
        return _first_line(err)
    parts = re.split(r"^rank (\d+):$", text, flags=re.MULTILINE)
    found = []
    for rank, trace in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line.strip() for line in trace.splitlines() if line.strip()]
        if lines:
            found.append(f"rank {rank}: {lines[-1][:300]}")
    return "; ".join(found) or _first_line(err)


# -- the Trainer ---------------------------------------------------------------------------------------------------
def check_trainer(device: torch.device, timeout: float) -> Row:
    """``L.Trainer(devices=2, strategy=CMPStrategy())`` fits the MLP for 2 steps (one process per device, NCCL on
    GPUs); rank 0's weights afterwards must equal single-process SGD's. Runs in its own process group with a
    timeout (Lightning starts rank 1 by re-running this module's command line)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return _row(
            "trainer_fit",
            SKIP,
            f"needs 2 GPUs (the Trainer runs one worker per GPU, over NCCL); this machine has "
            f"{torch.cuda.device_count()}",
        )
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-trainer-") as tmp:
        result = Path(tmp) / "trainer.json"
        command = [sys.executable, "-m", "lightning_cmp.bench.gpu_smoke", "--trainer-run"]
        command += ["--device", device.type, "--out", str(result)]
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.communicate()
            return _row("trainer_fit", FAIL, f"did not finish within {timeout:.0f} s (killed)")
        finally:
            _kill_group(proc.pid)  # rank 1, had rank 0 left it behind
        data = _read_json(result)
    if proc.returncode != 0 or not isinstance(data, dict):
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line] or lines
        return _row("trainer_fit", FAIL, f"exit code {proc.returncode}: {errors[-1] if errors else 'no output'}")
    return _row("trainer_fit", PASS if data["ok"] else FAIL, str(data["detail"]))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _trainer_run(device: torch.device, out: Path) -> None:
    """The Trainer check's worker (rank 0 and, re-launched by Lightning, rank 1): fit, then rank 0 compares."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_cmp

    class SmokeModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp(torch.device("cpu"))
            self.losses: list[float] = []

        def forward(self, x: Tensor) -> Tensor:
            return self.net(x)

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            loss = F.cross_entropy(self(batch[0]), batch[1])
            self.losses.append(float(loss.detach().item()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return _optimizer(self.parameters())

    _full_precision()
    module = SmokeModule()
    data = _batches(torch.device("cpu"))
    loader = DataLoader(
        TensorDataset(torch.cat([x for x, _ in data]), torch.cat([y for _, y in data])), batch_size=BATCH
    )
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=WORLD,
        strategy=lightning_cmp.CMPStrategy(),
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out.parent),
    )
    trainer.fit(module, loader)
    if trainer.global_rank != 0:
        return
    ref_state, ref_losses = _reference(_device(device.type))
    state = {k: v.detach().cpu() for k, v in module.net.state_dict().items()}  # whole again on rank 0 after fit
    weights, loss = _relative_error(state, ref_state), _loss_error(module.losses, ref_losses)
    ok = trainer.global_step == STEPS and weights < TOLERANCE and loss < TOLERANCE
    detail = (
        f"{WORLD} workers on {device.type}, {trainer.global_step} steps: rank 0's weights vs single-process SGD "
        f"{weights:.1e}, losses {loss:.1e} (limit {TOLERANCE:g})"
    )
    _write_json(out, {"ok": ok, "detail": detail})


# -- running it all -----------------------------------------------------------------------------------------------
def run_checks(
    device: str = "cuda",
    timeout: float = 90,
    budget: float = 360,
    only: Sequence[str] | None = None,
    on_row: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Every check (or those named in ``only``) on ``device``; ``on_row`` sees each row as soon as it is made."""
    _full_precision()
    deadline = time.monotonic() + budget
    dev = _device(device)
    wanted = set(only) if only is not None else None
    unknown = (wanted or set()) - {*CHECKS, *SCENARIOS, "trainer_fit"}
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; known: {[*CHECKS, *SCENARIOS, 'trainer_fit']}")
    rows: list[Row] = []

    def add(new: Iterable[Row]) -> None:
        for row in new:
            rows.append(row)
            if on_row is not None:
                on_row(row)

    usable = dev.type != "cuda" or torch.cuda.is_available()
    for name, check in CHECKS.items():
        if wanted is not None and name not in wanted:
            continue
        if not usable and name != "environment":
            add([_row(name, SKIP, "no CUDA device")])
            continue
        try:
            add([check(dev)])
        except Exception as err:
            add([_row(name, FAIL, _first_line(err))])
    names = [n for n in SCENARIOS if wanted is None or n in wanted]
    if names:
        add(
            _scenario_rows(names, dev, timeout, deadline)
            if usable
            else [_row(n, SKIP, "no CUDA device") for n in names]
        )
    if wanted is None or "trainer_fit" in wanted:
        left = deadline - time.monotonic()
        if not usable:
            add([_row("trainer_fit", SKIP, "no CUDA device")])
        elif left < 15:
            add([_row("trainer_fit", SKIP, "not run: the smoke test's time budget (--budget) is spent")])
        else:
            try:
                add([check_trainer(dev, min(timeout, left))])
            except Exception as err:
                add([_row("trainer_fit", FAIL, _first_line(err))])
    return rows


def format_table(rows: Sequence[Row]) -> str:
    width = max([len("check"), *(len(r["check"]) for r in rows)])
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{r['check']:<{width}}  {r['result']:<6}  {r['detail']}" for r in rows]
    counts = {k: sum(r["result"] == k for r in rows) for k in (PASS, FAIL, SKIP)}
    lines.append(f"gpu_smoke totals: PASS {counts[PASS]} / FAIL {counts[FAIL]} / SKIP {counts[SKIP]}")
    return "\n".join(lines)


def _default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_smoke.json" if os.environ.get("OUT") else Path("gpu_smoke.json")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lightning_cmp.bench.gpu_smoke",
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="where every check runs")
    p.add_argument("--out", type=Path, default=None, help="JSON results ($OUT/gpu_smoke.json or ./gpu_smoke.json)")
    p.add_argument("--timeout", type=float, default=90, help="seconds for one multi-process launch")
    p.add_argument("--budget", type=float, default=360, help="seconds for the whole run; checks after it are skipped")
    p.add_argument("--only", nargs="+", default=None, metavar="CHECK", help="run only these checks")
    p.add_argument("--trainer-run", action="store_true", help=argparse.SUPPRESS)  # the Trainer check's workers
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out or _default_out()
    if args.trainer_run:
        _trainer_run(torch.device(args.device), out)
        return 0
    started = time.time()
    report: dict[str, Any] = {
        "device": args.device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "rows": [],
    }
    print(f"gpu_smoke on {args.device}: results go to {out}", flush=True)

    def on_row(row: Row) -> None:
        report["rows"].append(row)
        report["seconds"] = round(time.time() - started, 1)
        _write_json(out, report)
        print(f"  {row['result']:<4}  {row['check']}: {row['detail']}", flush=True)

    rows = run_checks(args.device, args.timeout, args.budget, args.only, on_row)
    print("\n" + format_table(rows), flush=True)
    return 1 if any(r["result"] == FAIL for r in rows) else 0


if __name__ == "__main__":
    # Run from the package's own module, not __main__, so the spawned workers find the functions by name.
    from lightning_cmp.bench.gpu_smoke import main as _main

    sys.exit(_main())
