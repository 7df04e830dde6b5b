"""prefect-raydog: a Ray cluster on the YellowDog Platform for each Prefect flow run."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each. Imported lazily so that the Builder and the
# local platform work without importing Prefect, while `prefect block register -m prefect_raydog`
# still finds the blocks through attribute access.
_EXPORTS: dict[str, str] = {}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_raydog' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
