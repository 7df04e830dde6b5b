"""Griffe extension: document `prefect_raydog`'s lazily exported names under their public paths.

`prefect_raydog/__init__.py` imports its public names on first access (`_EXPORTS`), which static
analysis cannot see; this adds each as an alias, so the API reference can say
`prefect_raydog.RayDogCluster` wherever the class is defined.
"""

from __future__ import annotations

import importlib

import griffe


class PublicNames(griffe.Extension):
    """Add an alias to `prefect_raydog` for every name in its `_EXPORTS`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: object) -> None:
        if pkg.path != "prefect_raydog":
            return
        exports: dict[str, str] = importlib.import_module("prefect_raydog")._EXPORTS
        for name, module in exports.items():
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))
