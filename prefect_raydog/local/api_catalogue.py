"""The local platform's catalogue routes: compute requirement and compute source templates,
provisioning or testing a template without a worker pool, namespaces, and the application."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from prefect_raydog.local.request_bodies import object_body, params
from prefect_raydog.local.state import PlatformState


def catalogue_routes(router: APIRouter, state: PlatformState) -> None:
    @router.get("/compute/templates/requirements")
    def search_requirement_templates(request: Request) -> Any:
        return state.search_requirement_templates(params(request))

    @router.get("/compute/templates/requirements/{template_id}")
    def get_requirement_template(template_id: str) -> Any:
        return state.get_requirement_template(template_id)

    @router.get("/compute/namespaces/{namespace}/templates/requirements/{name}")
    def get_requirement_template_by_name(namespace: str, name: str) -> Any:
        return state.get_requirement_template_by_name(namespace, name)

    @router.get("/compute/templates/sources")
    def search_source_templates(request: Request) -> Any:
        return state.search_source_templates(params(request))

    @router.get("/compute/templates/sources/{template_id}")
    def get_source_template(template_id: str) -> Any:
        return state.get_source_template(template_id)

    @router.get("/compute/namespaces/{namespace}/templates/sources/{name}")
    def get_source_template_by_name(namespace: str, name: str) -> Any:
        return state.get_source_template_by_name(namespace, name)

    @router.get("/namespaces")
    def search_namespaces(request: Request) -> Any:
        return state.search_namespaces(params(request))

    @router.get("/namespaces/{namespace_id}")
    def get_namespace(namespace_id: str) -> Any:
        return state.get_namespace(namespace_id)

    @router.get("/application")
    def application_details() -> Any:
        return state.application_details()

    @router.post("/compute/templates/provision")
    async def provision_compute_requirement(request: Request) -> Any:
        usage = await object_body(request, "ComputeRequirementTemplateUsage")
        return state.provision_compute_requirement(usage)

    @router.put("/compute/templates/test")
    async def test_requirement_template(request: Request) -> Any:
        usage = await object_body(request, "ComputeRequirementTemplateUsage")
        return state.test_requirement_template(usage)
