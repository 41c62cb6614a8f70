"""How one rank runs a lowered schedule: messages, stage copies, averaging and the executor."""

from lightning_cmp.runtime.comm import Comm, PeerLostError
from lightning_cmp.runtime.executor import Executor, Step
from lightning_cmp.runtime.optim import OptimizerLayout
from lightning_cmp.runtime.pipeline import AVERAGING, Pipeline
from lightning_cmp.runtime.stage import StageActivations, StageCopy
from lightning_cmp.runtime.trace import chrome_trace, write_trace

__all__ = [
    "AVERAGING",
    "Comm",
    "Executor",
    "OptimizerLayout",
    "PeerLostError",
    "Pipeline",
    "StageActivations",
    "StageCopy",
    "Step",
    "chrome_trace",
    "write_trace",
]
