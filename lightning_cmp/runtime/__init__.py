"""How one rank runs a lowered schedule: messages, stage copies, averaging and the executor."""

from lightning_cmp.runtime.asynchronous import AsyncPipeline
from lightning_cmp.runtime.comm import Comm, PeerLostError
from lightning_cmp.runtime.executor import Executor, Step
from lightning_cmp.runtime.optim import OptimizerLayout
from lightning_cmp.runtime.pipeline import AVERAGING, Pipeline
from lightning_cmp.runtime.stage import StageActivations, StageCopy
from lightning_cmp.runtime.trace import chrome_trace, write_trace
from lightning_cmp.runtime.weights import StageWeights

__all__ = [
    "AVERAGING",
    "AsyncPipeline",
    "Comm",
    "Executor",
    "OptimizerLayout",
    "PeerLostError",
    "Pipeline",
    "StageActivations",
    "StageCopy",
    "StageWeights",
    "Step",
    "chrome_trace",
    "write_trace",
]
