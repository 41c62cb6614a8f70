"""The ``pytorch_lightning`` twin of ``lightning_cmp.strategy``, built from the same source at import time.

``lightning`` and ``pytorch_lightning`` ship the same classes twice, and each Trainer accepts only
strategies derived from its own package's base class. Rather than keeping two copies of the glue, the
twin is compiled from ``strategy.py`` with its ``lightning.pytorch``/``lightning.fabric`` imports
rewritten, the way Lightning builds its own mirror packages. The rewrite keeps every line where it was and the
code is compiled under ``strategy.py``'s own file name, so tracebacks show ``strategy.py``'s lines and coverage
counts them; mypy checks that file. Users of ``pytorch_lightning`` get the class as
``lightning_cmp.pytorch_lightning.CMPStrategy``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_twin"]

_TWIN = "lightning_cmp._strategy_pytorch_lightning"


def load_twin() -> ModuleType | None:
    """Import (once) and return the twin module, or None when ``pytorch_lightning`` is not installed."""
    if _TWIN in sys.modules:
        return sys.modules[_TWIN]
    if importlib.util.find_spec("pytorch_lightning") is None or importlib.util.find_spec("lightning_fabric") is None:
        return None
    path = Path(__file__).parent / "strategy.py"
    source = path.read_text()
    source = source.replace("lightning.pytorch", "pytorch_lightning").replace("lightning.fabric", "lightning_fabric")
    module = ModuleType(_TWIN)
    module.__file__ = str(path)
    sys.modules[_TWIN] = module
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module
