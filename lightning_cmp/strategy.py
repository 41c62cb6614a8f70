"""Lightning glue: ``CMPStrategy`` runs any LightningModule's forward through a pipeline schedule.

The strategy is written once, as `CMPStrategyCore`, against the ``lightning`` package's classes; what each Lightning
package must see its own copies of (the base class, launchers, precision plugins, a warning category) comes with the
subclass and its `Flavour`. ``CMPStrategy`` here is the ``lightning`` one; `lightning_cmp.pytorch_lightning`
defines the ``pytorch_lightning`` one the same way, in a few lines.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import lightning.fabric.utilities.warnings as lightning_warnings
import lightning.pytorch.plugins.precision as lightning_precision
import lightning.pytorch.strategies.launchers as lightning_launchers
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.strategies.launchers.subprocess_script import _basic_subprocess_cmd
from lightning.fabric.utilities.distributed import (
    DistributedSamplerWrapper,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
    _set_num_threads_if_needed,
)
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from lightning_cmp.errors import CMPConfigError
from lightning_cmp.glue.checkpoints import StreamedCheckpoint, check_keys, gathered_optimizer_state
from lightning_cmp.glue.checks import check_arguments, check_asynchronous, check_sharded, check_unscaling, check_world
from lightning_cmp.glue.collectives import reduce_over_pipelines
from lightning_cmp.glue.module import (
    average_rest_gradients,
    base_seed,
    broadcast_rest,
    explain_reads,
    materialize_rest,
    restore_metric_sync,
    submodule,
    sync_metrics_over_pipelines,
    to_device,
)
from lightning_cmp.glue.optimizers import RateHistory, set_learning_rates, unwrap
from lightning_cmp.glue.pipeline import build_pipeline, localize_optimizers
from lightning_cmp.microbatch import MicrobatchLoss
from lightning_cmp.partition import Chain, trace_chain
from lightning_cmp.runtime import Comm, OptimizerLayout, Pipeline, process
from lightning_cmp.runtime.asynchronous import AsyncPipeline
from lightning_cmp.runtime.comm import peers_lost
from lightning_cmp.runtime.groups import DataGroups
from lightning_cmp.runtime.liveness import stop_processes
from lightning_cmp.runtime.memory import WorkerBytes, worker_bytes
from lightning_cmp.runtime.plan import Partition, check_partition
from lightning_cmp.runtime.process import STARTUP_TIMEOUT
from lightning_cmp.runtime.scaler import agree_on_overflow
from lightning_cmp.runtime.state import fill
from lightning_cmp.runtime.trace import write_trace
from lightning_cmp.runtime.weights import check_predictable
from lightning_cmp.schedule import SCHEDULES, Placement, get_schedule

__all__ = ["CMPStrategy"]

log = logging.getLogger(__name__)
# As Lightning does for its own logger: the package's INFO messages (the split chosen on the first batch, a restart)
# show by default, unless the application configured logging itself (a handler on the root logger).
_package_log = logging.getLogger("lightning_cmp")
if not logging.getLogger().hasHandlers() and not _package_log.handlers:
    _package_log.setLevel(logging.INFO)
    _package_log.addHandler(logging.StreamHandler())
    _package_log.propagate = False

# A killed peer usually fails a gloo call at once; this bounds the wait on a hung one (torch's default: 30 min).
DEFAULT_TIMEOUT = timedelta(seconds=120)
#: How long a worker may stop answering heartbeats before the others declare it lost (``heartbeat_timeout``).
DEFAULT_HEARTBEAT_TIMEOUT = timedelta(seconds=30)
# The rendezvous waits for the slowest worker to start (import torch, or be scheduled on another node), which is
# not a hang: it gets at least this long whatever ``timeout`` is, and the group's timeout is set after it.

#: Optimizer steps between two checks that the copies of every stage are still identical (and at the end of fit).
CHECK_COPIES_EVERY = 50


if TYPE_CHECKING:
    from lightning_cmp.checkpoint_io import AtomicCheckpointIO  # at run time: `_atomic_checkpoint_io`

    # the cores are checked against lightning's classes; at run time each subclass brings its own package's
    _StrategyBase = ParallelStrategy
    _LauncherBase = _SubprocessScriptLauncher
else:
    _StrategyBase = _LauncherBase = object


@dataclass(frozen=True)
class Flavour:
    """What one Lightning package (``lightning`` or ``pytorch_lightning``) gives the strategy from its own classes:
    its Trainer accepts only its own launchers and precision plugins, and warns with its own categories."""

    subprocess_launcher: type[Any]
    multiprocessing_launcher: type[Any]
    #: the package's ``_SubprocessScriptLauncher`` with `RestartingLaunch` mixed in (`Flavour.of` makes it)
    restarting_launcher: type[Any]
    #: the precision plugins a split model runs under. Exact types: FSDP, DeepSpeed, bitsandbytes and Transformer
    #: Engine plugins subclass these but shard, quantize or replace layers in ways a split model does not expect.
    precisions: tuple[type[Any], ...]
    possible_user_warning: type[Warning]

    @classmethod
    def of(cls, launchers: ModuleType, precision: ModuleType, fabric_warnings: ModuleType) -> Flavour:
        """The flavour of the package whose ``strategies.launchers`` and ``plugins.precision`` modules are given,
        with its fabric's ``utilities.warnings``."""
        subprocess_launcher = launchers._SubprocessScriptLauncher
        return cls(
            subprocess_launcher=subprocess_launcher,
            multiprocessing_launcher=launchers._MultiProcessingLauncher,
            restarting_launcher=type(
                "RestartingLauncher", (RestartingLaunch, subprocess_launcher), {"__module__": __name__}
            ),
            precisions=tuple(
                getattr(precision, n) for n in ("Precision", "MixedPrecision", "HalfPrecision", "DoublePrecision")
            ),
            possible_user_warning=fabric_warnings.PossibleUserWarning,
        )


class RestartingLaunch(_LauncherBase):
    """Lightning's script launcher, started under torch's elastic agent: on ``launch`` the process replaces itself
    with ``torchrun --standalone --nproc-per-node=N --max-restarts=R <the same command>``; in the workers the agent
    starts, Lightning sees TorchElastic's environment and this launcher runs the function in place. Mixed into each
    package's ``_SubprocessScriptLauncher`` (`Flavour.restarting_launcher`)."""

    def __init__(self, cluster_environment: ClusterEnvironment, num_processes: int, max_restarts: int) -> None:
        super().__init__(cluster_environment, num_processes, 1)
        self.max_restarts = max_restarts

    @override
    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        if not self.cluster_environment.creates_processes_externally:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={self.num_processes}",
                f"--max-restarts={self.max_restarts}",
                *_basic_subprocess_cmd()[1:],
            ]
            log.info("lightning_cmp: restarting under torch's elastic agent: %s", " ".join(command))
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(sys.executable, command)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class CMPStrategyCore(_StrategyBase):
    """`CMPStrategy` without its Lightning package: a subclass adds the package's ``ParallelStrategy`` and sets
    ``_flavour`` (see `CMPStrategy` and ``lightning_cmp.pytorch_lightning.CMPStrategy``)."""

    _flavour: ClassVar[Flavour]

    strategy_name = "cmp"

    def __init__(
        self,
        num_stages: int | None = None,
        schedule: str = "cmp",
        partition: str | Sequence[int] | Mapping[str, Sequence[int]] = "balanced",
        averaging: str = "gradient",
        average_every: int = 1,
        module: str | None = None,
        num_microbatches: int | None = None,
        trace: str | None = None,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_TIMEOUT,
        heartbeat_timeout: timedelta | None = DEFAULT_HEARTBEAT_TIMEOUT,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        max_restarts: int = 0,
        keep_split: bool = False,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io if checkpoint_io is not None else _atomic_checkpoint_io()(),
            precision_plugin=precision_plugin,
        )
        check_arguments(num_stages, schedule, partition, averaging, average_every)
        if num_microbatches is not None and num_microbatches < 1:
            raise CMPConfigError(f"num_microbatches={num_microbatches}; use a whole number >= 1 (or None)")
        self.num_microbatches = num_microbatches or get_schedule(schedule).default_microbatches
        self.trace = trace
        self.num_stages = num_stages
        self.schedule = schedule
        self.partition: Partition = partition
        if isinstance(partition, Mapping):
            self.partition = {k: list(v) for k, v in partition.items()}
        elif not isinstance(partition, str):
            self.partition = [int(c) for c in partition]
        self.averaging = averaging
        self.average_every = average_every
        self.module_name = module
        self._process_group_backend = process_group_backend
        self._timeout = timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._start_method = start_method
        if max_restarts < 0:
            raise CMPConfigError(f"max_restarts={max_restarts}; use 0 (no restarts) or more")
        self.max_restarts = max_restarts
        self._chain: Chain | None = None
        self._target: nn.Module | None = None
        self._pipeline: Pipeline | None = None
        self._comm: Comm | None = None  # every rank; set up with the process group, names a lost peer
        self._groups: DataGroups | None = None  # with several data-parallel pipelines
        self._layouts: list[OptimizerLayout] = []
        self._optimizer_steps = 0
        self._failed = False
        self._peers_lost = False
        self._metric_sync: dict[nn.Module, tuple[bool, Any]] = {}
        self._undo_scaler: Callable[[], None] | None = None
        self._inject_sampler: bool | None = None
        self._step_call: tuple[tuple[Any, ...], dict[str, Any]] | None = None  # training_step's arguments, in it
        self._microbatch_loss: MicrobatchLoss | None = None  # this step's, with a loss per microbatch
        self._rates = RateHistory()  # asynchronous schedules: each step's learning rates since the pipeline filled
        self.keep_split = keep_split
        # A checkpoint restored before the pipeline exists: applied to each rank's own stages when it is built.
        self._pending_state: Mapping[str, Tensor] | None = None
        self._pending_optimizer_states: list[dict[str, Any]] | None = None
        self._streamed = StreamedCheckpoint()  # keep_split=True: the checkpoint being written stage by stage

    # -- what Lightning asks of a parallel strategy -----------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        return True

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[self.local_rank]

    @property
    def num_processes(self) -> int:
        return len(self.parallel_devices) if self.parallel_devices is not None else 0

    @property
    def num_nodes(self) -> int:
        return getattr(self, "_num_nodes", 1)

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        self._num_nodes = num_nodes

    @property
    def num_groups(self) -> int:
        """Data-parallel pipelines: the number of workers divided by ``num_stages``."""
        world = self.num_processes * self.num_nodes
        return world // self.num_stages if self.num_stages else 1

    @property
    def group_index(self) -> int:
        """This worker's pipeline (0 .. ``num_groups`` - 1): its share of the data."""
        return self.global_rank // self.num_stages if self.num_stages else 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every worker of one pipeline must see the same batch: one data-parallel replica per pipeline.
        return {"num_replicas": self.num_groups, "rank": self.group_index}

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Lightning's sampler injection, kept only where it is needed: a shuffled loader is shuffled alike on
        every worker (seeded with ``PL_GLOBAL_SEED``, reshuffled each epoch); ``shuffle=False`` keeps its order.

        Under any distributed strategy Lightning wraps a training loader in ``DistributedSampler(shuffle=True)``,
        even one built with ``shuffle=False``; `setup` turns that injection off and this does the part we need.
        """
        if not (self._inject_sampler and isinstance(dataloader, DataLoader)):
            return dataloader
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        predicting = trainer is not None and trainer.state.fn == TrainerFn.PREDICTING
        shuffled = isinstance(dataloader.sampler, RandomSampler) and not predicting
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        kwargs = self.distributed_sampler_kwargs
        if kwargs["num_replicas"] > 1:  # several pipelines: each its share, as Lightning's ddp would split it
            if isinstance(dataloader.sampler, RandomSampler | SequentialSampler):
                sampler: Any = DistributedSampler(dataloader.dataset, shuffle=shuffled, seed=seed, **kwargs)
            else:
                sampler = DistributedSamplerWrapper(dataloader.sampler, shuffle=False, **kwargs)
            return _update_dataloader(dataloader, sampler)
        if not shuffled:
            return dataloader  # a sequential or the user's own sampler: as on one device
        sampler = DistributedSampler(dataloader.dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
        return _update_dataloader(dataloader, sampler)

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        to_device(self.model, self.root_device)

    @contextmanager
    @override
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        # empty_init=True (Trainer.init_module): build on the meta device; each worker materialises its stages.
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        # configure_model() builds on the meta device: nothing is allocated until each worker's stages are known.
        with torch.device("meta"):
            yield

    def worker_bytes(self) -> WorkerBytes:
        """Bytes of parameters, buffers, gradients and optimizer state this worker holds right now.

        Examples:
            >>> strategy.worker_bytes().state  # parameters + gradients + optimizer state  # doctest: +SKIP
            1234567
        """
        modules: list[nn.Module] = [m for m in (self.lightning_module,) if m is not None]
        if self._pipeline is not None:
            modules += [c.module for c in self._pipeline.copies.values()]
        return worker_bytes(modules, [unwrap(opt) for opt in self.optimizers])

    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        self._check_world()
        if self.max_restarts:
            if self.num_nodes > 1:
                raise CMPConfigError(
                    f"max_restarts={self.max_restarts} restarts a job on one machine; with num_nodes="
                    f"{self.num_nodes} start the script with torchrun --max-restarts={self.max_restarts} on every node"
                )
            launcher = self._flavour.restarting_launcher
            self._launcher = launcher(self.cluster_environment, self.num_processes, self.max_restarts)
        elif self._start_method == "popen":
            launcher = self._flavour.subprocess_launcher
            self._launcher = launcher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = self._flavour.multiprocessing_launcher(self, start_method=self._start_method)

    def _check_world(self) -> None:
        self.num_stages = check_world(
            self.num_processes, self.num_nodes, self.num_stages, self.schedule, self.averaging
        )

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cpu":
            _set_num_threads_if_needed(num_processes=self.num_processes)
        reset_seed()
        assert self.cluster_environment is not None
        self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
        self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank  # type: ignore[attr-defined]
        backend = self._process_group_backend or _get_default_process_group_backend_for_device(self.root_device)
        self._process_group_backend = backend
        created = not dist.is_initialized()
        startup = None if self._timeout is None else max(self._timeout, STARTUP_TIMEOUT)
        _init_dist_connection(
            self.cluster_environment, backend, timeout=startup, **process.elastic_attempt_store(startup)
        )
        if created and self._timeout is not None and self._timeout < STARTUP_TIMEOUT:
            process.set_group_timeout(self._timeout)
        if created:
            process.register_exit_cleanup()
        # From here on every collective, Lightning's included, names the rank that died or hung.
        self._comm = Comm.world(self.global_rank, self.root_device)
        self._watch_heartbeats(True)
        if self.num_stages is None:  # an external launcher set the world without _configure_launcher
            self.num_stages = self.world_size
        if self.num_groups > 1 or self.averaging == "sharded":  # sharded: over the mirror pair too
            replicas = get_schedule(self.schedule).num_replicas
            placement = Placement(self.num_stages, replicas)
            self._groups = DataGroups.build(self._comm, self.num_stages, placement, self._timeout)
        self._quiet_inapplicable_warnings()

    def _watch_heartbeats(self, on: bool) -> None:
        """Start this process's heartbeat (once; it beats until the process exits) and watch the other workers
        while this Trainer runs (``on``), or stop watching (its run is over: the others may be finishing)."""
        if self._heartbeat_timeout is None or self.world_size < 2:
            return
        process.watch_heartbeats(
            on,
            self.global_rank,
            self.world_size,
            self._comm.processes if self._comm is not None else {},
            self._heartbeat_timeout,
            self._on_heartbeat_lost,
        )

    def _on_heartbeat_lost(self, rank: int, message: str) -> None:
        """In the heartbeat thread: report, stop the workers this process launched (a stopped one would outlive
        the job), and end this process (its main thread may wait in a collective until ``timeout``)."""
        launched = self._launcher.procs if isinstance(self._launcher, self._flavour.subprocess_launcher) else []
        processes = self._comm.processes if self._comm is not None else {}
        process.end_for_lost_peer(self.global_rank, rank, message, launched, processes)

    def _quiet_inapplicable_warnings(self) -> None:
        """Hide the warnings a user of this strategy cannot act on (once per process, from `setup_environment`).

        Lightning's "use ``self.log(..., sync_dist=True)`` when logging on epoch level": with one pipeline every rank
        already holds the same value (it stays when there are several pipelines: there it applies). torch 2.14's
        ``LeafSpec`` deprecation, raised inside Lightning's own ``CombinedLoader`` on every rank.
        """
        if self.num_groups == 1:
            warnings.filterwarnings(
                "ignore",
                message=r"It is recommended to use `self\.log\(.*sync_dist=True\)`",
                category=self._flavour.possible_user_warning,
            )
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
        )

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        module = self.lightning_module
        assert module is not None
        if not module.automatic_optimization:
            raise CMPConfigError(
                f"strategy={self.schedule!r} runs the backward itself and supports automatic optimization only; "
                f"{type(module).__name__}.automatic_optimization is False: remove it or use strategy='ddp'"
            )
        _check_precision(self.precision_plugin, self.schedule, self._flavour.precisions)
        connector = trainer._accelerator_connector
        if self._inject_sampler is None:  # the user's use_distributed_sampler; `process_dataloader` honours it
            self._inject_sampler = connector.use_distributed_sampler
        connector.use_distributed_sampler = False
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._trace(module)
        if trainer.state.fn == TrainerFn.FITTING:
            # Lightning itself refuses several optimizers under automatic optimization, which we require.
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)
            self._check_training(trainer)
        self._patch(module)

    def _check_training(self, trainer: Trainer) -> None:
        """What the asynchronous schedules and the sharded form cannot run with, refused before training."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        clip = trainer.gradient_clip_val
        if get_schedule(self.schedule).asynchronous:
            accumulate = trainer.accumulate_grad_batches
            check_asynchronous(self.schedule, self.partition, self.num_microbatches, accumulate, clip, scaler)
            if get_schedule(self.schedule).weights == "predict":
                for optimizer in self.optimizers:
                    check_predictable(unwrap(optimizer))
        if self.averaging == "sharded":
            check_sharded(self.schedule, self.partition, self.num_microbatches, clip, scaler, self.keep_split)

    def _trace(self, module: LightningModule) -> None:
        target = submodule(module, self.module_name) if self.module_name else module
        name = self.module_name or type(module).__name__
        self._chain = trace_chain(target, name=name)
        self._target = target
        stages = self.num_stages or self.num_processes * self.num_nodes
        check_partition(self.partition, self._chain, stages)  # the block count and explicit cuts, before training

    def _patch(self, module: LightningModule) -> None:
        assert self._target is not None
        target = self._target
        target.__dict__["forward"] = self._forward  # instance attribute: nn.Module.__call__ finds it
        plugin = self.precision_plugin
        unclipped = plugin.clip_grad_by_norm
        plugin.__dict__["clip_grad_by_norm"] = lambda optimizer, clip_val: self._clip(optimizer, clip_val, unclipped)
        scaler = getattr(plugin, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler) and self._comm is not None:
            check_unscaling(self.optimizers)
            self._undo_scaler = agree_on_overflow(scaler, self._comm)
        self._metric_sync = sync_metrics_over_pipelines(module, self._groups)

    def _unpatch(self) -> None:
        if self._target is not None:
            self._target.__dict__.pop("forward", None)
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        if self._undo_scaler is not None:
            self._undo_scaler()
            self._undo_scaler = None
        restore_metric_sync(self._metric_sync)
        self._metric_sync = {}

    # -- the pipeline, built on the first batch ----------------------------------------------------------
    def _forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not isinstance(x, Tensor):  # refused on every rank alike, before any message is exchanged
            raise CMPConfigError(
                f"the split module was called with a {type(x).__name__}; lightning_cmp pipelines take one tensor: "
                "unpack the batch in training_step (e.g. self(batch['image'])) or pass module='<submodule>' "
                "naming a submodule called with a tensor"
            )
        if args or kwargs:
            raise CMPConfigError(
                f"the split module was called with {len(args) + 1} positional and {len(kwargs)} keyword "
                "arguments; lightning_cmp pipelines take one tensor: pass module='<submodule>' naming a "
                "submodule called as module(x)"
            )
        if self._microbatch_loss is not None and self._microbatch_loss.active:
            return self._microbatch_loss.forward(x)  # training_step run for one microbatch's loss
        if self._pipeline is None:
            with torch.inference_mode(False), torch.no_grad():
                self._pipeline = self._build_pipeline(x)
            if self.trace is not None:
                self._pipeline.executor.timings = []
        module = self.lightning_module  # the global step keys dropout masks: a resumed run draws the same ones
        step = module.trainer.global_step if module is not None else None
        if self._pipeline.loss_per_microbatch and torch.is_grad_enabled():
            if self._step_call is None or module is None:
                raise CMPConfigError(
                    f"the model was called with gradients enabled outside training_step; with num_microbatches="
                    f"{self.num_microbatches} `cmp` trains it only inside training_step (it runs the user's loss "
                    "there per microbatch). Call it under torch.no_grad() elsewhere"
                )
            self._microbatch_loss = MicrobatchLoss(module, *self._step_call, inputs=x)
            return self._pipeline(x, step=step, loss_fn=self._microbatch_loss)
        return self._pipeline(x, step=step)

    def _build_pipeline(self, x: Tensor) -> Pipeline:
        assert self._chain is not None and self.lightning_module is not None
        world = self._comm or Comm.world(self.global_rank, self.root_device)
        pipeline = build_pipeline(
            self._chain,
            x,
            world,
            self._groups,
            self.partition,
            self.schedule,
            self.num_microbatches,
            self.averaging,
            base_seed(),
            self._pending_split_state(),
        )
        scaler = getattr(self.precision_plugin, "scaler", None)
        if isinstance(scaler, torch.amp.GradScaler):  # the microbatch losses are scaled like Lightning's loss
            pipeline.loss_scale = scaler.scale
        # The rest of the module's values, and the optimizers narrowed to this rank's stages (state restored).
        self._materialize_rest(base_seed())
        if self._groups is not None:
            broadcast_rest(self.lightning_module, self._chain.root, self._prefix, self._groups.world)
        optimizers = [unwrap(opt) for opt in self.optimizers]
        saved, sharded = self._pending_optimizer_states, self.averaging == "sharded"
        self._layouts = localize_optimizers(pipeline, self._chain, optimizers, saved, sharded)
        self._pending_state, self._pending_optimizer_states = None, None
        return pipeline

    def _pending_split_state(self) -> dict[str, Tensor] | None:
        """The restored checkpoint's entries for the split module, keyed as in it."""
        if self._pending_state is None:
            return None
        prefix = self._prefix
        return {k[len(prefix) :]: v for k, v in self._pending_state.items() if k.startswith(prefix)}

    @property
    def _prefix(self) -> str:
        """The split module's key prefix in the LightningModule's state dict."""
        return f"{self.module_name}." if self.module_name else ""

    def _materialize_rest(self, seed: int) -> None:
        """The module's tensors outside the split module: restored, or given memory and a seeded initialisation."""
        module = self.lightning_module
        assert module is not None and self._chain is not None
        materialize_rest(module, self._chain.root, self._prefix, self.root_device, seed, self._pending_state)

    def _clip(self, optimizer: Optimizer, clip_val: float, unclipped: Callable[[Optimizer, float], None]) -> None:
        if self._pipeline is None:
            return unclipped(optimizer, clip_val)
        local = {id(p) for p in self._pipeline.local_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in local]
        extra = [p.grad for p in params if p.grad is not None]
        self._pipeline.clip_grad_norm_(float(clip_val), extra)
        return None

    # -- steps ------------------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._step_call, self._microbatch_loss = (args, kwargs), None
        try:
            with explain_reads(lambda: self._pipeline, "training_step", self.schedule, self.global_rank):
                output = super().training_step(*args, **kwargs)
                loss = output.get("loss") if isinstance(output, Mapping) else output
                if isinstance(loss, Tensor) and loss.is_meta:  # a 0-dim real tensor plus a meta one is meta
                    raise RuntimeError("the loss it returned is a meta tensor")
        finally:
            self._step_call = None
        self._microbatch_loss = None
        return output

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with explain_reads(lambda: self._pipeline, "validation_step", self.schedule, self.global_rank):
            return super().validation_step(*args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with explain_reads(lambda: self._pipeline, "test_step", self.schedule, self.global_rank):
            return super().test_step(*args, **kwargs)

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        if get_schedule(self.schedule).asynchronous:
            return self._asynchronous_step(optimizer, closure, model, **kwargs)
        if self._groups is not None:
            user_closure = closure

            def closure(user_closure: Callable[[], Any] = user_closure) -> Any:
                result = user_closure()
                if self._pipeline is not None and self._chain is not None and self._groups is not None:
                    assert self.lightning_module is not None
                    average_rest_gradients(self.lightning_module, self._chain.root, self._prefix, self._groups)
                return result

        result = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._optimizer_steps += 1
        if self._pipeline is not None:
            self._pipeline.after_optimizer_step()  # sharded: the updated shards start out to every copy
        if self.averaging == "parameter" and self._optimizer_steps % self.average_every == 0:
            self._average_parameters()
        elif self.averaging != "parameter" and self._optimizer_steps % CHECK_COPIES_EVERY == 0:
            self._check_copies(f"after optimizer step {self._optimizer_steps}")
        return result

    def _asynchronous_step(self, optimizer: Any, closure: Callable[[], Any], model: Any, **kwargs: Any) -> Any:
        """Lightning's step of an asynchronous schedule: the gradient on this rank belongs to the mini-batch fed
        ``K - k - 1`` steps ago, so it is applied with that step's learning rates; the pipeline is drained after the
        last batch of an epoch and at ``max_steps``."""
        inner = unwrap(optimizer)
        slot = self._rates.record(inner)
        now = self._rates.steps[slot]

        def closure_at_batch_rates() -> Any:
            result = closure()
            pipeline = self._pipeline
            if isinstance(pipeline, AsyncPipeline):
                batch = slot - (pipeline.num_stages - pipeline.comm.me - 1)
                if batch >= 0:
                    self._rates.apply(inner, batch)
            return result

        try:
            result = super().optimizer_step(optimizer, closure_at_batch_rates, model, **kwargs)
        finally:
            set_learning_rates(inner, now)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None:
            last = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            if last or (trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps):
                self._drain()
        return result

    def _drain(self) -> None:
        """Finish every mini-batch an asynchronous pipeline has in flight, each update at its step's learning
        rates (a collective: every rank drains at the same points)."""
        pipeline = self._pipeline
        if not isinstance(pipeline, AsyncPipeline) or pipeline.fed == 0:
            self._rates = RateHistory()
            return
        self._rates.drain([unwrap(opt) for opt in self.optimizers], pipeline.drain)

    @override
    def on_train_end(self) -> None:
        self._drain()
        if self.averaging != "parameter":
            self._check_copies("at the end of fit")

    def _check_copies(self, when: str) -> None:
        """The two copies of each stage are still identical (a collective; every rank raises alike if not)."""
        if self._pipeline is not None:
            self._pipeline.check_copies(when)

    def _average_parameters(self) -> None:
        if self._pipeline is not None and self.averaging == "parameter":
            self._pipeline.average_parameters()

    @override
    def on_validation_start(self) -> None:
        self._drain()
        self._average_parameters()

    @override
    def on_test_start(self) -> None:
        self._drain()
        self._average_parameters()

    @override
    def on_predict_start(self) -> None:
        self._drain()
        self._average_parameters()

    # -- collectives for Lightning ------------------------------------------------------------------------
    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        if self._groups is None or not isinstance(tensor, Tensor):
            return tensor
        return reduce_over_pipelines(self._groups, tensor, reduce_op, self.schedule, self.root_device)

    # Through the world Comm, so a peer lost in a checkpoint or an epoch-end decision is named like one
    # lost mid-step. Without a process group there is no one to agree with.
    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        comm = self._world()
        if comm is None:
            return decision
        flag = torch.tensor(int(decision), device=self.root_device)
        comm.all_reduce(flag, dist.ReduceOp.MIN if all else dist.ReduceOp.MAX)
        return bool(flag.item())

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        comm = self._world()
        if comm is not None:
            comm.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        comm = self._world()
        return obj if comm is None else comm.broadcast_object(obj, src)

    def _world(self) -> Comm | None:
        alive = self._comm is not None and dist.is_available() and dist.is_initialized()
        return self._comm if alive else None

    # -- checkpoints: one standard file keyed like the unsplit model ----------------------------------
    # Rank 0 assembles the file; the other ranks send their stages one tensor at a time and return what they
    # hold (their ``state_dict`` is not written: Lightning saves rank 0's only).
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        self._drain()  # a checkpoint holds no mini-batch in flight: resuming from it is exact
        state = module.state_dict()
        if self._pipeline is None:
            return state
        self._average_parameters()
        if self._streams():  # placeholders on rank 0, filled in as the owners send them by save_checkpoint
            if self.global_rank == 0:
                self._streamed.mark(state, self._pipeline, self._prefix)
            return state
        for name, tensor in (self._pipeline.full_state_dict(dst=0) or {}).items():
            state[self._prefix + name] = tensor
        return state

    def _streams(self) -> bool:
        """Whether checkpoints are written stage by stage (keep_split=True with a local AtomicCheckpointIO)."""
        atomic = _atomic_checkpoint_io()
        return self.keep_split and self._pipeline is not None and isinstance(self.checkpoint_io, atomic)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: str | Path, storage_options: Any | None = None
    ) -> None:
        if not self._streams():
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if self._groups is not None and self._groups.group != 0:
            return None  # pipeline 0 writes the file; its copies equal every other pipeline's
        assert self._pipeline is not None and isinstance(self.checkpoint_io, _atomic_checkpoint_io())
        self._streamed.save(self.checkpoint_io, checkpoint, filepath, storage_options, self._pipeline, self._layouts)
        return None

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        if strict:
            check_keys(module, state)
        self._pending_state = state
        if self._pipeline is not None:  # never in a Trainer run (restored before the first batch); kept for safety
            self._pipeline.load_full_state_dict(self._pending_split_state() or {})
            self._materialize_rest(base_seed())
            self._pending_state = None

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        layout = self._layout_of(optimizer)
        if self._pipeline is None or layout is None:
            return super().optimizer_state(optimizer)
        if self._streams():
            return self._streamed.optimizer_state(layout, self._layouts.index(layout), self._pipeline)
        return gathered_optimizer_state(layout, self._pipeline)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = list(checkpoint["optimizer_states"])
        if self._pipeline is None:  # loaded into each rank's own copies when the pipeline is built
            self._pending_optimizer_states = states
            return
        for layout, saved in zip(self._layouts, states, strict=False):
            layout.load_full_state_dict(saved, self._pipeline)

    def _layout_of(self, optimizer: Optimizer) -> OptimizerLayout | None:
        inner = unwrap(optimizer)
        return next((layout for layout in self._layouts if layout.optimizer is inner), None)

    # -- the end: the user's module is whole again on every worker -----------------------------------
    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        process.mark_failed()
        # Peers lost (dead or hung): workers this process started may never exit on their own.
        self._peers_lost = peers_lost(exception)
        if self._peers_lost:  # now: Lightning's process observer may kill this process before it prints
            log.error("[rank %d] %s: %s", self.global_rank, type(exception).__name__, exception)

    @override
    def teardown(self) -> None:
        if self._pipeline is not None and not self._failed:
            if self.trace is not None:  # a collective: every rank's timings, written once by rank 0
                every = self._pipeline.comm.all_gather_object(self._pipeline.executor.timings or [])
                if self.global_rank == 0:
                    write_trace(self.trace, every)
            self._average_parameters()
            if not self.keep_split:
                self._pipeline.restore_full_module(dst=0)
            if self._pipeline.shards is not None:  # the optimizer gets its parameters back, with whole state
                self._pipeline.shards.unshard()
            for layout in self._layouts:
                layout.restore()
        if self._pipeline is not None:
            self._pipeline.close(drain=not self._failed)
        elif self._pending_state is not None and not self._failed and not self.keep_split and self.global_rank == 0:
            # Restored but never run (e.g. resuming a finished fit): rank 0's module takes the checkpoint whole.
            module = self.lightning_module
            assert module is not None and self._comm is not None
            state = self._pending_state
            fill(module, [name for name in module.state_dict() if name in state], self._comm, 0, state)
        self._unpatch()
        self._pipeline, self._chain, self._target, self._layouts = None, None, None, []
        self._pending_state, self._pending_optimizer_states = None, None
        self._teardown_base()
        self._watch_heartbeats(False)
        if self._peers_lost and isinstance(self._launcher, self._flavour.subprocess_launcher):
            # A hung worker would outlive the job: Lightning kills the workers it started only on Ctrl-C.
            stopped = stop_processes(self._launcher.procs)
            if stopped:
                log.warning("lightning_cmp: killed worker processes %s, still there after the failure", stopped)

    def _teardown_base(self) -> None:
        """``ParallelStrategy.teardown``, except that tensors a rank does not hold (meta) stay where they are."""
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        _optimizers_to_device(self.optimizers, torch.device("cpu"))
        if self.lightning_module is not None:
            to_device(self.lightning_module, torch.device("cpu"))
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, spec in SCHEDULES.items():
            strategy_registry.register(name, cls, description=spec.description, schedule=name, override=True)
        strategy_registry.register(
            "sharded_dp",
            cls,
            description="data parallelism with Lee et al.'s overlapped averaging: gradients reduce-scattered during "
            "backward, a sharded optimizer step, weights all-gathered before the next forward",
            schedule="mp",
            num_stages=1,
            averaging="sharded",
            override=True,
        )


def _atomic_checkpoint_io() -> type[AtomicCheckpointIO]:
    """Imported on use: ``lightning_cmp.checkpoint_io`` imports Lightning, whose import registers this module's
    strategy; imported at the top, a script that imports ``checkpoint_io`` before Lightning would import this module
    from inside it, half-built, and the names would not be registered."""
    from lightning_cmp.checkpoint_io import AtomicCheckpointIO

    return AtomicCheckpointIO


def _check_precision(plugin: Precision, schedule: str, supported: tuple[type[Any], ...]) -> None:
    if type(plugin) not in supported:
        raise CMPConfigError(
            f"strategy={schedule!r} does not support the {type(plugin).__name__} precision plugin; use precision="
            "'32-true', '64-true', '16-true', 'bf16-true', '16-mixed' or 'bf16-mixed'"
        )


class CMPStrategy(CMPStrategyCore, ParallelStrategy):
    """Cross model parallelism: two reversed replicas of a split model train at once and stay averaged.

    The module to split (the LightningModule's ``forward`` by default, or ``module="net"``) is traced into
    blocks and cut into ``num_stages`` stages, one per worker. Replica A holds stage ``s`` on worker ``s``
    and replica B holds it on worker ``num_stages - 1 - s``; each takes half of every batch. The forward
    returns the whole batch's output on every worker, so ``training_step``, logging, metrics and callbacks
    run unchanged and see what one device would see.

    With more workers than stages (``devices x num_nodes = num_stages x D``), D pipelines train data-parallel:
    each gets its own part of the data (Lightning's distributed sampler over the D pipelines) and every copy of a
    stage in every pipeline is averaged with the others, so gradient averaging stays exact SGD on the union of the
    pipelines' batches. A pipeline's workers are consecutive ranks (on one node when the workers per node are a
    multiple of ``num_stages``). ``self.log(..., sync_dist=True)`` and torchmetrics average over the D pipelines.
    See the "Scaling out" page.

    Args:
        num_stages: stages the model is cut into; defaults to the number of workers. It must divide the number of
            workers (``devices x num_nodes``); the quotient is the number of data-parallel pipelines. ``1`` keeps
            the whole model on every worker (data parallelism only, e.g. ``strategy="sharded_dp"``).
        schedule: ``"cmp"`` (two reversed replicas), ``"mp"`` (plain model parallel baseline), ``"gpipe"``
            (one replica, ``num_microbatches`` microbatches, fill then drain), or an asynchronous 1F1B pipeline on
            whole mini-batches with per-stage updates: ``"spectrain"`` (weights predicted from the momentum),
            ``"pipedream"`` (weight stashing) or ``"async"`` (stale weights); see the "Asynchronous pipelines"
            page.
        partition: ``"balanced"`` (profile blocks on the first batch, minimise the slowest stage),
            ``"uniform"`` (equal block counts), ``"bipartition"`` (separate forward and backward cuts that even
            out the workers' loads, from costs measured on the first batch; see the "Bi-Partition" page),
            explicit cut indices (first block of stages 1..K-1) or an explicit Bi-Partition
            ``{"forward": [...], "backward": [...]}``.
        averaging: ``"gradient"`` (sum the copies' gradients every step; equals single-device training),
            ``"sharded"`` (the same result by Lee et al.'s overlapped form: gradients reduce-scattered over each
            stage's copies as backward makes them, each copy steps and keeps optimizer state for its 1/n shard, the
            updated weights all-gathered, each bucket waited for just before the first layer that uses it) or
            ``"parameter"`` (each replica steps on its half batch; weights and buffers averaged every
            ``average_every`` steps and whenever the model is evaluated, saved or returned).
        average_every: steps between parameter averages (``averaging="parameter"`` only).
        module: dotted name of the submodule to split; ``None`` splits the LightningModule's ``forward``.
        num_microbatches: microbatches per replica and step (``None``: the schedule's default, 1 for cmp/mp).
            With ``cmp`` and more than one, both directions interleave 1F1B-style and each microbatch's loss is
            computed as soon as its output exists: the last stage's worker runs ``training_step`` once more per
            microbatch on its rows, quietly (no logging, metric states restored); the loss must be made of
            per-sample terms (checked every step). See the "Microbatches" section of the design page.
        trace: path of a Chrome/Perfetto trace (JSON) of every rank's actions, written by rank 0 at the end
            of a successful run (``None``: no trace). Open it in https://ui.perfetto.dev.
        timeout: how long a worker waits for a peer that stopped answering before it fails with an error
            naming that peer's rank (default 120 s; a dead peer is noticed at once). Raise it when one step,
            the first-batch profiling or writing a checkpoint can keep the other workers waiting longer.
            Start-up, where the workers wait for the slowest one to start, is allowed at least 120 s.
        heartbeat_timeout: a worker that stops answering heartbeats for this long (stopped, hung, its host
            gone) is declared lost by the others, which end with an error naming its rank and host, even while
            they wait inside a long collective (default 30 s). Heartbeats come from a thread of their own, so a
            worker that is merely busy (a long step, profiling, a checkpoint) is never declared lost. ``None``
            turns them off (then a hung worker is found after ``timeout``). See the "Faults and restarts" page.
        max_restarts: restart the job this many times when a worker is lost (one machine; Lightning's
            ``python train.py`` launch): the script is started again from the top under torch's elastic agent
            (``torchrun --standalone --max-restarts``), which starts every worker afresh after a failure. Combine
            it with ``ModelCheckpoint(save_last=True)`` and ``fit(ckpt_path="last")`` to resume from the last
            checkpoint. On several nodes start the script with ``torchrun --max-restarts`` yourself.
        keep_split: for a model no single worker can hold: no process ever assembles it. Checkpoints are
            written stage by stage (rank 0 writes each tensor as its owner sends it) and after ``fit`` every rank
            keeps only its own stages. Default ``False``: rank 0 gathers the model to write a checkpoint and
            holds the whole LightningModule after ``fit`` (for ``test``, ``predict`` and your code); the other
            ranks hold their stages. Checkpoints are one standard file either way.
        checkpoint_io: defaults to [`AtomicCheckpointIO`][lightning_cmp.checkpoint_io.AtomicCheckpointIO]
            (a crash while saving keeps the previous file).

    Memory: a LightningModule that builds its layers in ``configure_model()`` (or under
    ``Trainer.init_module(empty_init=True)``) is created on the meta device, and each worker gives memory only
    to the stages it runs (initialised by each layer's ``reset_parameters()``, seeded per layer so the values do
    not depend on the number of workers). A module built in ``__init__`` is whole on every worker until the
    first batch, when each worker releases the stages it does not run. See the "Large models" page.

    Examples:
        >>> import lightning as L
        >>> import lightning_cmp  # registers "cmp", "mp", "gpipe", "spectrain", "pipedream" and "async"
        >>> strategy = lightning_cmp.CMPStrategy(partition=[5], module="net")
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1)  # doctest: +SKIP
        >>> trainer = L.Trainer(accelerator="cpu", devices=2, strategy="cmp", max_epochs=1)  # doctest: +SKIP
    """

    _flavour = Flavour.of(lightning_launchers, lightning_precision, lightning_warnings)


# Importing this module (the first use of lightning_cmp.CMPStrategy) registers the names with its Lightning.
CMPStrategy.register_strategies(StrategyRegistry)
