"""What one worker holds during a Trainer run: state bytes at each moment, live activation bytes, and RSS."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from torch.optim import Optimizer
from typing_extensions import override

from lightning_cmp.bench.measure import peak_rss_mib
from lightning_cmp.runtime.memory import WorkerBytes, held_bytes, tensors_in, worker_bytes

__all__ = ["ActivationMeter", "MemoryProbe", "RssSampler", "current_mib", "tensors_in"]


def current_mib(field: str = "VmRSS") -> float | None:
    """This process's ``field`` of ``/proc/self/status`` (``VmRSS``, ``VmData``) in MiB; ``None`` off Linux.

    Examples:
        >>> current_mib() is None or current_mib() > 0
        True
    """
    return _status((field,)).get(field)


def _status(fields: tuple[str, ...]) -> dict[str, float]:
    try:
        with open("/proc/self/status") as f:
            lines = [line.split() for line in f if line.split(":")[0] in fields]
    except OSError:
        return {}
    return {line[0].rstrip(":"): int(line[1]) / 1024 for line in lines}


class ActivationMeter:
    """Live bytes of the tensors autograd keeps for the backward pass, other than parameters; and their peak.

    Every tensor an operation saves for backward passes through a ``saved_tensors_hooks`` pack hook; the
    meter counts its storage once however many operations save it (a ReLU output that the next layer saves
    too), and releases it when autograd frees the last saved reference (after that node's backward). Views and
    copies of parameters (a linear layer saves its weight) are left out by storage; tensors an operation only
    uses transiently (workspaces, the incoming gradient) are not saved, so they are not counted: RSS covers them.

    Examples:
        >>> import torch
        >>> net = nn.Linear(256, 256)
        >>> meter = ActivationMeter(lambda: {p.untyped_storage().data_ptr() for p in net.parameters()})
        >>> with meter:
        ...     loss = net(torch.randn(4, 256, requires_grad=True)).relu().sum()
        >>> meter.live, meter.peak  # the input the weight gradient needs and the ReLU's output: 4 KiB each
        (8192, 8192)
        >>> loss.backward(); meter.live
        0
    """

    def __init__(self, parameter_storages: Callable[[], set[int]]) -> None:
        self.live = 0
        self.peak = 0
        self._parameter_storages = parameter_storages
        self._refs: dict[int, int] = {}
        self._hooks = saved_tensors_hooks(self._pack, _unpack)
        self._active = False

    def __enter__(self) -> ActivationMeter:
        if not self._active:
            self._hooks.__enter__()
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            self._hooks.__exit__()
            self._active = False

    def _pack(self, tensor: Tensor) -> Any:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage (sparse, some subclasses)
            return tensor.detach()
        ptr = storage.data_ptr()
        if tensor.is_meta or ptr == 0 or ptr in self._parameter_storages():
            return tensor.detach()
        if ptr not in self._refs:
            self._refs[ptr] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self._refs[ptr] += 1
        return _Saved(tensor.detach(), self, ptr, storage.nbytes())

    def _release(self, ptr: int, nbytes: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            del self._refs[ptr]
            self.live -= nbytes


class _Saved:
    """What autograd stores instead of a saved tensor: the tensor (detached), released with the graph."""

    __slots__ = ("meter", "nbytes", "ptr", "tensor")

    def __init__(self, tensor: Tensor, meter: ActivationMeter, ptr: int, nbytes: int) -> None:
        self.tensor, self.meter, self.ptr, self.nbytes = tensor, meter, ptr, nbytes

    def __del__(self) -> None:
        self.meter._release(self.ptr, self.nbytes)


def _unpack(packed: Any) -> Tensor:
    return packed.tensor if isinstance(packed, _Saved) else packed


class RssSampler(threading.Thread):
    """Samples this process's RSS and private data every ``interval`` s; `take` returns their peaks since the last call.

    ``ru_maxrss`` gives the exact peak RSS of the whole run; the sampler tells which part of the run reached it,
    and the peak of private data (``VmData``, what ``RLIMIT_DATA`` caps), which the kernel does not keep. A peak
    shorter than ``interval`` can be missed.

    Examples:
        >>> sampler = RssSampler(0.01); sampler.start()
        >>> rss, data = sampler.take()
        >>> rss > 0 and data > 0
        True
        >>> sampler.stop()
    """

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval = interval
        self._peaks = (0.0, 0.0)
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.interval):
            self._sample()

    def _sample(self) -> tuple[float, float]:
        now = _status(("VmRSS", "VmData"))
        sample = (now.get("VmRSS", 0.0), now.get("VmData", 0.0))
        with self._lock:
            self._peaks = (max(self._peaks[0], sample[0]), max(self._peaks[1], sample[1]))
        return sample

    def take(self) -> tuple[float, float]:
        """Peak (RSS, VmData) in MiB since the previous call, now included."""
        now = self._sample()
        with self._lock:
            peaks, self._peaks = self._peaks, now
        return peaks

    def stop(self) -> None:
        self._stopped.set()


class MemoryProbe(L.Callback):
    """Records what this worker holds at set-up, after every step, at the checkpoint and at the end of training.

    Each point has the bytes of parameters, buffers, gradients and optimizer state (``CMPStrategy.worker_bytes``
    when the strategy has it: the module, its stage copies and the optimizers; otherwise the LightningModule and
    the Trainer's optimizers), the resident set (RSS; ``RssShmem`` of it is shared memory, e.g. ``cmp``'s gradient
    exchange), private data (``VmData``, what ``RLIMIT_DATA`` caps) and the peaks of both since the previous point.
    At the checkpoint it adds ``checkpoint_extra``: bytes of checkpoint tensors that are not the worker's own
    (a gathered copy of other workers' stages). Call `record` once more after ``fit`` for the ``after fit`` point.
    ``on_exception(trainer, error)`` is called first thing when training fails.

    Examples:
        >>> probe = MemoryProbe()
        >>> trainer = L.Trainer(callbacks=[probe], max_steps=3)  # doctest: +SKIP
        >>> trainer.fit(model); probe.record("after fit", trainer); probe.points[-1]["state"]  # doctest: +SKIP
    """

    def __init__(self, on_exception: Callable[[L.Trainer, BaseException], None] | None = None) -> None:
        self.on_error = on_exception
        self.points: list[dict[str, Any]] = []
        self._trainer: L.Trainer | None = None
        self.activations = ActivationMeter(self._parameter_storages)
        self.rss = RssSampler()
        self.rss.start()

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.record("set-up", trainer)
        self.activations.__enter__()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.record(f"step {trainer.global_step}", trainer)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.record("checkpoint", trainer, checkpoint)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.activations.__exit__()
        self.record("end of training", trainer)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.activations.__exit__()
        if self.on_error is not None:
            self.on_error(trainer, exception)

    def record(self, point: str, trainer: L.Trainer, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
        """Append (and return) what this worker holds now, named ``point``."""
        entry: dict[str, Any] = {"point": point, **held(trainer).as_dict()}
        if checkpoint is not None:
            own = list(_own_tensors(trainer))
            entry["checkpoint_extra"] = held_bytes([*own, *tensors_in(checkpoint)]) - held_bytes(own)
        entry["rss_mib"] = current_mib("VmRSS")
        entry["rss_shmem_mib"] = current_mib("RssShmem")
        entry["vm_data_mib"] = current_mib("VmData")
        rss, data = self.rss.take()
        entry["peak_rss_since_previous_mib"], entry["peak_vm_data_since_previous_mib"] = round(rss, 1), round(data, 1)
        self.points.append(entry)
        return entry

    def _parameter_storages(self) -> set[int]:
        if self._trainer is None:
            return set()
        return {t.untyped_storage().data_ptr() for t in _parameters(self._trainer)}


def held(trainer: L.Trainer) -> WorkerBytes:
    """``trainer.strategy.worker_bytes()`` when the strategy counts its own holdings, else module + optimizers."""
    counted = getattr(trainer.strategy, "worker_bytes", None)
    if callable(counted):
        result = counted()
        if isinstance(result, WorkerBytes):
            return result
    module: nn.Module | None = trainer.lightning_module
    return worker_bytes([module] if module is not None else [], trainer.optimizers)


def _parameters(trainer: L.Trainer) -> Iterator[Tensor]:
    module = trainer.lightning_module
    if module is not None:
        yield from module.parameters()
        yield from module.buffers()
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            yield from group["params"]


def _own_tensors(trainer: L.Trainer) -> Iterator[Tensor]:
    for t in _parameters(trainer):
        yield t
        if t.grad is not None:
            yield t.grad
    opt: Optimizer
    for opt in trainer.optimizers:
        yield from tensors_in(list(opt.state.values()))


def process_summary(base_rss_mib: float | None) -> dict[str, Any]:
    """The whole-process figures a record ends with: peak RSS (``ru_maxrss``) and RSS before the model existed."""
    return {"pid": os.getpid(), "peak_rss_mib": round(peak_rss_mib(), 1), "base_rss_mib": base_rss_mib}
