"""Compute requirement templates of the local platform: what kind of node a worker pool gets
(instance type, size, boot delay, whether its tasks run as real processes or are simulated)."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement

from prefect_raydog.local.nodes import NodeImage
from prefect_raydog.local.wire import ACCOUNT, TYPE_PREFIX

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
    image: NodeImage | None = None
    """A process node's image: with one, the node is sealed as a cloud VM (it sees only the
    image, runs its userdata at boot, runs tasks as `yd-agent`); without, it sees the host's
    Python and packages."""

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.id.split("/", 1)[1]

    @property
    def requirement_template_id(self) -> str:
        """The template's YellowDog id (`ydid:crt:...`), the same on every run."""
        return f"ydid:crt:{ACCOUNT}:{uuid.uuid5(_IDS, 'crt/' + self.id)}"

    @property
    def source_template_id(self) -> str:
        """The id of the template's one compute source template (`ydid:cst:...`)."""
        return f"ydid:cst:{ACCOUNT}:{uuid.uuid5(_IDS, 'cst/' + self.id)}"

    @property
    def description(self) -> str:
        return f"Local {self.mode.value} nodes ({self.instance_type})"

    def source(self) -> dict[str, Any]:
        """The template's compute source, as a `SimulatorComputeSource` document."""
        return {
            "type": TYPE_PREFIX + "SimulatorComputeSource",
            "name": self.id.replace("/", "-"),
            "region": REGION,
            "instanceType": self.instance_type,
            "imageId": IMAGE,
            "instanceStartupTimeSeconds": round(self.boot_delay_s),
            "limit": 0,
        }

    def requirement_template(self) -> dict[str, Any]:
        """The `ComputeRequirementStaticTemplate` document."""
        source = {
            "sourceTemplateId": self.source_template_id,
            "instanceType": self.instance_type,
            "imageId": IMAGE,
        }
        return {**self.requirement_template_summary(), "sources": [source]}

    def requirement_template_summary(self) -> dict[str, Any]:
        return {
            "type": TYPE_PREFIX + "ComputeRequirementStaticTemplate",
            "id": self.requirement_template_id,
            "namespace": self.namespace,
            "name": self.name,
            "description": self.description,
            "strategyType": TYPE_PREFIX + "SingleSourceProvisionStrategy",
        }

    def source_template(self) -> dict[str, Any]:
        """The `ComputeSourceTemplate` document."""
        return {
            "id": self.source_template_id,
            "namespace": self.namespace,
            "description": self.description,
            "source": self.source(),
            "attributes": [],
        }

    def source_template_summary(self) -> dict[str, Any]:
        return {
            "id": self.source_template_id,
            "namespace": self.namespace,
            "name": self.id.replace("/", "-"),
            "description": self.description,
            "sourceType": TYPE_PREFIX + "SimulatorComputeSource",
            "provider": PROVIDER,
        }


_IDS = uuid.UUID("5d1f0c52-7a0e-4c55-9a47-6c6f63616c79")
PROVIDER = "ON_PREMISE"
REGION = "local"
IMAGE = "local"

BUILT_IN = (
    Template(id="local/process", mode=NodeMode.PROCESS),
    Template(id="local/simulated", mode=NodeMode.SIMULATED, instance_type="local-simulated"),
    Template(id="local/vm", mode=NodeMode.PROCESS, image=NodeImage()),
    Template(id="local/base-vm", mode=NodeMode.PROCESS, image=NodeImage(bare=True)),
)
IMAGES = ("driver", "base")
"""The values of a template file's `image` field: "driver" is the driver's node requirements,
"base" the machine's system Python alone."""

_FIELDS = {
    "mode": str,
    "instance_type": str,
    "vcpus": (int, float),
    "memory_gb": (int, float),
    "boot_delay_s": (int, float),
    "boot_failure_rate": (int, float),
    "image": str,
    "image_packages": list,
}


class TemplateCatalogue:
    """The built-in templates plus those declared in a TOML file."""

    def __init__(self, templates_file: Path | None = None) -> None:
        self._templates = {template.id: template for template in BUILT_IN}
        if templates_file is not None:
            for template in load_templates(templates_file):
                self._templates[template.id] = template

    def get(self, template_id: str) -> Template:
        """The template with id `namespace/name`, or with its `ydid:crt:` or `ydid:cst:` id."""
        try:
            return self._templates[template_id]
        except KeyError:
            for template in self._templates.values():
                if template_id in (template.requirement_template_id, template.source_template_id):
                    return template
            known = ", ".join(sorted(self._templates))
            raise TemplateError(
                f"Unknown compute requirement template '{template_id}': known templates are {known}"
            ) from None

    def ids(self) -> list[str]:
        return sorted(self._templates)

    def all(self) -> list[Template]:
        return [self._templates[template_id] for template_id in self.ids()]


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
    fields = {name: table[name] for name in _FIELDS
              if name in table and name not in ("mode", "image", "image_packages")}
    return Template(id=template_id, mode=mode, image=_image(where, mode, table), **fields)


def _image(where: str, mode: NodeMode, table: dict[str, Any]) -> NodeImage | None:
    packages = table.get("image_packages", [])
    if "image" not in table:
        if packages:
            raise TemplateError(f"{where}: field 'image_packages' needs field 'image'")
        return None
    if table["image"] not in IMAGES:
        raise TemplateError(f"{where}: field 'image' must be one of {list(IMAGES)}")
    if mode is not NodeMode.PROCESS:
        raise TemplateError(f"{where}: field 'image' needs mode 'process'")
    for package in packages:
        try:
            Requirement(package)
        except (InvalidRequirement, TypeError):
            raise TemplateError(
                f"{where}: field 'image_packages' must be a list of requirements, "
                f"not {package!r}") from None
    if packages and table["image"] == "base":
        raise TemplateError(f"{where}: field 'image_packages' needs image 'driver'")
    return NodeImage(packages=tuple(packages), bare=table["image"] == "base")
