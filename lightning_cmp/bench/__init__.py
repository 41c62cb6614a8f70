"""Benchmark of lightning_cmp's schedules against single device, torch pipelining and DDP."""
