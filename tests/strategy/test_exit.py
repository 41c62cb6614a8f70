"""The process group a worker created is destroyed at exit after a success, and left alone after a failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.python import run_python

SCRIPT = """
import sys
import torch.distributed as dist
from lightning_cmp.runtime import process

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
if sys.argv[2] == "failed":
    process.mark_failed()
process.destroy_process_group_at_exit()
print("initialized" if dist.is_initialized() else "destroyed")
"""


@pytest.mark.parametrize(("outcome", "expected"), [("ok", "destroyed"), ("failed", "initialized")])
def test_process_group_destroyed_at_exit_only_after_success(tmp_path: Path, outcome: str, expected: str) -> None:
    proc = run_python("-c", SCRIPT, str(tmp_path / "store"), outcome, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == expected
