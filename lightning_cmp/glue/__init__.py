"""The strategy's concerns that need no Lightning, one module each: checks, the module, optimizers, checkpoints.

`lightning_cmp.strategy` is the Lightning glue (the Strategy subclass, its hooks, launch and process group); what
it decides or computes without Lightning's classes lives here, so the ``pytorch_lightning`` twin shares it as is.
"""
