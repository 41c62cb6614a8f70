"""How one rank runs a lowered schedule: messages, stage copies, averaging and the executor."""

from lightning_cmp.runtime.comm import Comm
from lightning_cmp.runtime.executor import Executor, Step
from lightning_cmp.runtime.optim import OptimizerLayout
from lightning_cmp.runtime.pipeline import AVERAGING, Pipeline
from lightning_cmp.runtime.stage import StageActivations, StageCopy

__all__ = ["AVERAGING", "Comm", "Executor", "OptimizerLayout", "Pipeline", "StageActivations", "StageCopy", "Step"]
