"""Compute requirement templates of the local platform: what kind of node a worker pool gets
(instance type, size, boot delay, whether its tasks run as real processes or are simulated)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class NodeMode(str, Enum):
    """How a node's tasks run: as local processes, or simulated (no processes at all)."""

    PROCESS = "process"
    SIMULATED = "simulated"


class TemplateError(ValueError):
    """A template file or lookup is invalid; the message names the template and the field."""


@dataclass(frozen=True)
class Template:
    """One compute requirement template, looked up by id `namespace/name`."""

    id: str
    mode: NodeMode
    instance_type: str = "local-2cpu-4gb"
    vcpus: float = 2.0
    memory_gb: float = 4.0
    boot_delay_s: float = 0.0
    boot_failure_rate: float = 0.0
    supported_task_types: tuple[str, ...] = ("bash",)


BUILT_IN = (
    Template(id="local/process", mode=NodeMode.PROCESS),
    Template(id="local/simulated", mode=NodeMode.SIMULATED, instance_type="local-simulated"),
)

_FIELDS = {
    "mode": str,
    "instance_type": str,
    "vcpus": (int, float),
    "memory_gb": (int, float),
    "boot_delay_s": (int, float),
    "boot_failure_rate": (int, float),
}


class TemplateCatalogue:
    """The built-in templates plus those declared in a TOML file."""

    def __init__(self, templates_file: Path | None = None) -> None:
        self._templates = {template.id: template for template in BUILT_IN}
        if templates_file is not None:
            for template in load_templates(templates_file):
                self._templates[template.id] = template

    def get(self, template_id: str) -> Template:
        try:
            return self._templates[template_id]
        except KeyError:
            known = ", ".join(sorted(self._templates))
            raise TemplateError(
                f"Unknown compute requirement template '{template_id}': known templates are {known}"
            ) from None

    def ids(self) -> list[str]:
        return sorted(self._templates)


def load_templates(path: Path) -> list[Template]:
    """Read templates from a TOML file of tables `[templates."ns/name"]` with the fields of
    `Template` (mode is "process" or "simulated")."""
    with path.open("rb") as file:
        document = tomllib.load(file)
    tables = document.get("templates", {})
    if not isinstance(tables, dict):
        raise TemplateError(f"{path}: 'templates' must be a table of templates")
    return [_template_from_table(path, template_id, table) for template_id, table in tables.items()]


def _template_from_table(path: Path, template_id: str, table: object) -> Template:
    where = f"{path}: template '{template_id}'"
    if "/" not in template_id:
        raise TemplateError(f"{where}: the id must be 'namespace/name'")
    if not isinstance(table, dict):
        raise TemplateError(f"{where}: must be a table")
    unknown = set(table) - set(_FIELDS)
    if unknown:
        raise TemplateError(
            f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}"
        )
    for name, kinds in _FIELDS.items():
        if name in table and (not isinstance(table[name], kinds) or isinstance(table[name], bool)):
            raise TemplateError(f"{where}: field '{name}' has the wrong type")
    try:
        mode = NodeMode(table.get("mode", NodeMode.SIMULATED.value))
    except ValueError:
        raise TemplateError(f"{where}: field 'mode' must be 'process' or 'simulated'") from None
    rate = float(table.get("boot_failure_rate", 0.0))
    if not 0.0 <= rate <= 1.0:
        raise TemplateError(f"{where}: field 'boot_failure_rate' must be between 0 and 1")
    if float(table.get("boot_delay_s", 0.0)) < 0:
        raise TemplateError(f"{where}: field 'boot_delay_s' must not be negative")
    fields = {name: table[name] for name in _FIELDS if name in table and name != "mode"}
    return Template(id=template_id, mode=mode, **fields)
