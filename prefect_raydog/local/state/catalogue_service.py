"""YellowDog's catalogue services: compute requirement and compute source templates (the local
templates as real template documents), namespaces, and the calling application's details."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from prefect_raydog.local.state.errors import NotFound
from prefect_raydog.local.state.search import Query, contains, matches
from prefect_raydog.local.state.simulation import Simulation
from prefect_raydog.local.templates import Template, TemplateError
from prefect_raydog.local.wire import ACCOUNT

_NAMESPACE_IDS = uuid.UUID("0c3f0a77-2d55-4a8e-8f0e-6e616d657370")
APPLICATION_NAME = "local"


def namespace_id(namespace: str) -> str:
    return f"ydid:namespace:{ACCOUNT}:{uuid.uuid5(_NAMESPACE_IDS, namespace)}"


class CatalogueService(Simulation):
    """Search and read templates and namespaces, and describe the application."""

    def _template(self, template_id: str, what: str) -> Template:
        try:
            return self.templates.get(template_id)
        except TemplateError:
            raise NotFound(f"{what} '{template_id}' not found") from None

    def _templates_named(self, namespace: str, name: str, what: str) -> Template:
        return self._template(f"{namespace}/{name}", what)

    def _search_templates(
        self, params: dict[str, list[str]], render: Callable[[Template], dict[str, Any]]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """A template search over the summaries `render` makes: a page when `sliced=true`,
        else the whole list (the SDK's `find_all_*` form)."""
        query = Query(params)
        found = [
            summary
            for summary in map(render, self.templates.all())
            if matches(query, "namespaces", summary["namespace"])
            and contains(query, "name", summary["name"])
            and matches(query, "type", summary.get("type"))
            and matches(query, "strategyType", summary.get("strategyType"))
            and matches(query, "sourceTypes", summary.get("sourceType"))
            and matches(query, "sourceType", summary.get("sourceType"))
        ]
        if query.flag("sliced"):
            return query.page(found, dict)
        return found

    def search_requirement_templates(
        self, params: dict[str, list[str]]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        return self._search_templates(params, Template.requirement_template_summary)

    def get_requirement_template(self, template_id: str) -> dict[str, Any]:
        return self._template(template_id, "Compute requirement template").requirement_template()

    def get_requirement_template_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        what = "Compute requirement template"
        return self._templates_named(namespace, name, what).requirement_template()

    def search_source_templates(
        self, params: dict[str, list[str]]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        return self._search_templates(params, Template.source_template_summary)

    def get_source_template(self, template_id: str) -> dict[str, Any]:
        if not template_id.startswith("ydid:cst:"):
            raise NotFound(f"Compute source template '{template_id}' not found")
        return self._template(template_id, "Compute source template").source_template()

    def get_source_template_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        for template in self.templates.all():
            if (template.namespace, template.source()["name"]) == (namespace, name):
                return template.source_template()
        raise NotFound(f"Compute source template '{namespace}/{name}' not found")

    def _namespaces(self) -> list[str]:
        """Every namespace in use: the templates' and those of every entity ever created."""
        with self._cond:
            used = {t.namespace for t in self.templates.all()}
            for entities in (self._requirements, self._pools, self._compute):
                used.update(entity.namespace for entity in entities.values())
        return sorted(used)

    def search_namespaces(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        deletable = query.flag("deletable")
        found = (
            ns
            for ns in self._namespaces()
            if matches(query, "namespace", ns)
            and matches(query, "namespaces", ns)
            and contains(query, "namespaceContains", ns)
            and deletable is not True
        )
        return query.page(found, _namespace_document)

    def get_namespace(self, ns_id: str) -> dict[str, Any]:
        for namespace in self._namespaces():
            if namespace_id(namespace) == ns_id:
                return _namespace_document(namespace)
        raise NotFound(f"Namespace '{ns_id}' not found")

    def application_details(self) -> dict[str, Any]:
        """The calling application: it can read every namespace."""
        return {
            "accountId": f"ydid:account:{ACCOUNT}",
            "accountName": "local",
            "id": f"ydid:app:{ACCOUNT}:{uuid.uuid5(_NAMESPACE_IDS, 'app/' + APPLICATION_NAME)}",
            "name": APPLICATION_NAME,
            "allNamespacesReadable": True,
            "readableNamespaces": self._namespaces(),
            "features": ["PLATFORM"],
        }


def _namespace_document(namespace: str) -> dict[str, Any]:
    # Every namespace listed holds (or held) something, so none can be deleted.
    return {"id": namespace_id(namespace), "namespace": namespace, "deletable": False}
