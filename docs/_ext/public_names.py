"""Griffe extension for the API reference: `prefect_raydog`'s public names, and block fields.

- `prefect_raydog/__init__.py` imports its public names on first access (`_EXPORTS`), which
  static analysis cannot see; each is added as an alias, so the reference can say
  `prefect_raydog.RayDogCluster` wherever the class is defined.
- The blocks' fields are pydantic fields of Prefect `Block`s, some made by a helper; their
  descriptions are read from the classes themselves and shown as the fields' docstrings.
"""

from __future__ import annotations

import importlib
from typing import Any

import griffe


class PublicNames(griffe.Extension):
    """Add an alias to `prefect_raydog` for every name in its `_EXPORTS`."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "prefect_raydog":
            return
        exports: dict[str, str] = importlib.import_module("prefect_raydog")._EXPORTS
        for name, module in exports.items():
            if name not in pkg.members:
                pkg.set_member(name, griffe.Alias(name, f"{module}.{name}", parent=pkg))


class BlockFields(griffe.Extension):
    """Give each field of a Prefect block its pydantic description as docstring."""

    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if not cls.path.startswith("prefect_raydog.") or not cls.module.path.endswith("blocks"):
            return
        runtime = getattr(importlib.import_module(cls.module.path), cls.name, None)
        for name, field in (getattr(runtime, "model_fields", None) or {}).items():
            member = cls.members.get(name)
            if isinstance(member, griffe.Attribute) and field.description and not member.docstring:
                member.docstring = griffe.Docstring(field.description, parent=member)
                member.labels.add("block-field")
