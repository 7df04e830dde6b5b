"""The local platform's HTTP API: YellowDog's REST routes mapped onto `PlatformState`, with
`yd-key` auth, gzip request bodies, YellowDog's error bodies and the `/_local/` control routes."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_raydog.local.api_catalogue import catalogue_routes
from prefect_raydog.local.faults import FaultKind, FaultPlan
from prefect_raydog.local.request_bodies import flag, json_body, json_list, object_body, params
from prefect_raydog.local.state import InvalidRequest, PlatformError, PlatformState
from prefect_raydog.local.wire import error_body

CONTROL_PREFIX = "/_local"
UPDATE_POLL_S = 0.1
KEEP_ALIVE_S = 10.0
WORK_REQUIREMENT_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
WORKER_POOL_FINAL = frozenset({"SHUTDOWN", "TERMINATED"})
COMPUTE_FINAL = frozenset({"TERMINATED"})


class ApiCalls:
    """How often each route was called, keyed `"METHOD /route/{template}"`. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


class _NormalisePath:
    """Strips the base path, collapses `//` and drops a trailing `/` before routing."""

    def __init__(self, app: ASGIApp, base_path: str) -> None:
        self.app = app
        self.base_path = base_path.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            while "//" in path:
                path = path.replace("//", "/")
            if self.base_path and (path == self.base_path or path.startswith(self.base_path + "/")):
                path = path[len(self.base_path) :]
            if len(path) > 1:
                path = path.rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


def create_app(
    state: PlatformState,
    faults: FaultPlan,
    api_calls: ApiCalls,
    key_id: str,
    key_secret: str,
    base_path: str = "",
    routers: tuple[APIRouter, ...] = (),
) -> ASGIApp:
    """The ASGI app of the local platform, answering at `base_path` (e.g. `/api`), with
    `routers` of services of its network (unauthenticated, at the server's root too)."""
    expected = f"yd-key {key_id}:{key_secret}"

    async def authorise(request: Request) -> None:
        header = request.headers.get("authorization")
        if header != expected:
            reason = "missing" if header is None else "not valid"
            raise _NotAuthorised(f"Authorization header is {reason}: use 'yd-key ID:SECRET'")

    async def observe(request: Request) -> None:
        route = request.scope.get("route")
        template = getattr(route, "path", request.url.path)
        api_calls.count(f"{request.method} {template}")
        fault = faults.take(request.method, request.scope["path"])
        if fault is not None:
            if fault.kind is FaultKind.DROP:
                faults.drop_connection(request.scope.get("client"))
            raise _InjectedFault(fault.kind, fault.retry_after_s)

    yellowdog = APIRouter(dependencies=[Depends(authorise), Depends(observe)])
    _work_routes(yellowdog, state)
    _worker_pool_routes(yellowdog, state)
    _compute_routes(yellowdog, state)
    catalogue_routes(yellowdog, state)
    control = APIRouter(prefix=CONTROL_PREFIX, dependencies=[Depends(authorise)])
    _control_routes(control, state, faults, api_calls)

    app = FastAPI(
        title="YellowDog (local)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        redirect_slashes=False,
    )
    app.include_router(control)
    app.include_router(yellowdog)
    for router in routers:
        app.include_router(router)
    app.add_exception_handler(PlatformError, _platform_error)
    app.add_exception_handler(_NotAuthorised, _not_authorised)
    app.add_exception_handler(_InjectedFault, _injected_fault)
    app.add_exception_handler(RequestValidationError, _invalid_parameters)
    app.add_exception_handler(Exception, _internal_error)
    app.add_exception_handler(404, _no_route)
    app.add_exception_handler(405, _no_route)
    return _NormalisePath(app, base_path)


class _NotAuthorised(Exception):
    pass


class _InjectedFault(Exception):
    def __init__(self, kind: FaultKind, retry_after_s: float | None) -> None:
        super().__init__(kind.value)
        self.kind, self.retry_after_s = kind, retry_after_s


async def _platform_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, PlatformError)
    return JSONResponse(error_body(error.error_type, error.message), error.status_code)


async def _not_authorised(_request: Request, error: Exception) -> Response:
    return JSONResponse(error_body("NotAuthorisedException", str(error)), 401)


async def _invalid_parameters(_request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
    return JSONResponse(error_body("InvalidRequestException", problems), 400)


async def _internal_error(_request: Request, error: Exception) -> Response:
    message = f"Internal error of the local platform: {type(error).__name__}: {error}"
    return JSONResponse(error_body("InternalServerException", message), 500)


async def _no_route(request: Request, error: Exception) -> Response:
    status = getattr(error, "status_code", 404)
    return JSONResponse(error_body(None, f"No route {request.method} {request.url.path}"), status)


async def _injected_fault(_request: Request, error: Exception) -> Response:
    assert isinstance(error, _InjectedFault)
    headers = {}
    if error.retry_after_s is not None:
        # HTTP allows only whole seconds here; urllib3 rejects "0.5" instead of retrying.
        headers["Retry-After"] = str(math.ceil(error.retry_after_s))
    if error.kind is FaultKind.INTERNAL_ERROR:
        body = error_body("InternalServerException", "Injected internal error")
        return JSONResponse(body, 500, headers=headers)
    status = 429 if error.kind is FaultKind.THROTTLED else 503
    return JSONResponse(
        error_body(None, f"Injected fault {error.kind.value}"), status, headers=headers
    )


def _updates(
    state: PlatformState, render: Callable[[], dict[str, Any]], final: frozenset[str]
) -> StreamingResponse:
    """Server-sent `entity_updated` events carrying the entity each time it changes (the first
    one at once), as the SDK's listeners and helpers expect; a comment keeps quiet streams open.
    The stream ends after the event of a `final` status, as YellowDog's CLI expects, or, when the
    platform stops, after one more event: yellowdog-sdk's reader looks at its cancel flag only
    when an event comes, and one that meets the stream's end without it spins at 100% CPU."""
    render()

    async def events() -> AsyncIterator[str]:
        last, quiet_since = "", time.monotonic()
        while True:
            entity = render()
            document = json.dumps(entity, separators=(",", ":"))
            if document != last or state.stopped:
                last, quiet_since = document, time.monotonic()
                yield f"event: entity_updated\ndata: {document}\n\n"
                if entity.get("status") in final or state.stopped:
                    return
            elif time.monotonic() - quiet_since > KEEP_ALIVE_S:
                quiet_since = time.monotonic()
                yield ":\n\n"
            await asyncio.sleep(UPDATE_POLL_S)

    return StreamingResponse(events(), media_type="text/event-stream")


def _work_routes(router: APIRouter, state: PlatformState) -> None:
    @router.post("/work/requirements")
    async def add_work_requirement(request: Request) -> Any:
        return state.add_work_requirement(await object_body(request, "WorkRequirement"))

    @router.put("/work/requirements")
    async def update_work_requirement(request: Request) -> Any:
        return state.update_work_requirement(await object_body(request, "WorkRequirement"))

    @router.get("/work/requirements")
    def search_work_requirements(request: Request) -> Any:
        return state.search_work_requirements(params(request))

    @router.get("/work/requirements/{requirement_id}")
    def get_work_requirement(requirement_id: str) -> Any:
        return state.get_work_requirement(requirement_id)

    @router.get("/work/requirements/{requirement_id}/updates")
    def work_requirement_updates(requirement_id: str) -> Response:
        return _updates(
            state, lambda: state.get_work_requirement(requirement_id), WORK_REQUIREMENT_FINAL
        )

    @router.put("/work/requirements/{requirement_id}/transition/{status}")
    def transition_work_requirement(
        requirement_id: str, status: str, abort: str | None = None
    ) -> Any:
        return state.transition_work_requirement(requirement_id, status, flag(abort))

    @router.get("/work/namespaces/{namespace}/requirements/{name:path}")
    def get_work_requirement_by_name(namespace: str, name: str) -> Any:
        return state.get_work_requirement_by_name(namespace, name)

    @router.post("/work/namespaces/{namespace}/requirements/{requirement}/taskGroups/{group}/tasks")
    async def add_tasks_by_name(
        namespace: str, requirement: str, group: str, request: Request
    ) -> Any:
        tasks = await _task_list(request)
        return state.add_tasks_by_name(namespace, requirement, group, tasks)

    @router.post("/work/taskGroups/{group_id}/tasks")
    async def add_tasks(group_id: str, request: Request) -> Any:
        return state.add_tasks(group_id, await _task_list(request))

    @router.get("/work/tasks")
    def search_tasks(request: Request) -> Any:
        return state.search_tasks(params(request))

    @router.get("/work/tasks/{task_id}")
    def get_task(task_id: str) -> Any:
        return state.get_task(task_id)

    @router.put("/work/tasks/{task_id}/cancel")
    def cancel_task(task_id: str, abort: str | None = None) -> Any:
        return state.cancel_task(task_id, flag(abort))


async def _task_list(request: Request) -> list[dict[str, Any]]:
    return await json_list(request, "Task")


def _worker_pool_routes(router: APIRouter, state: PlatformState) -> None:
    @router.post("/workerPools/provisioned/template")
    async def provision_worker_pool(request: Request) -> Any:
        return state.provision_worker_pool(await object_body(request, "provision request"))

    @router.put("/workerPools/provisioned/{pool_id}")
    def resize_worker_pool(pool_id: str, size: int) -> Any:
        return state.resize_worker_pool(pool_id, size)

    @router.get("/workerPools")
    def search_worker_pools(request: Request) -> Any:
        return state.search_worker_pools(params(request))

    @router.get("/workerPools/nodes")
    def search_nodes(request: Request) -> Any:
        return state.search_nodes(params(request))

    @router.get("/workerPools/nodes/{node_id}")
    def get_node(node_id: str) -> Any:
        return state.get_node(node_id)

    @router.get("/workerPools/nodes/{node_id}/actions")
    def get_node_actions(node_id: str) -> Any:
        return state.get_node_actions(node_id)

    @router.delete("/workerPools/nodes/{node_id}")
    def shut_down_node(node_id: str) -> Any:
        return state.shut_down_node(node_id)

    @router.get("/workerPools/workers/{worker_id}/node")
    def get_node_by_worker(worker_id: str) -> Any:
        return state.get_node_by_worker(worker_id)

    @router.post("/workerPools/{pool_id}/actions")
    async def add_node_actions(pool_id: str, request: Request) -> Response:
        state.add_node_actions(pool_id, await object_body(request, "AddNodeActionsRequest"))
        return Response(status_code=200)

    @router.get("/workerPools/{pool_id}/updates")
    def worker_pool_updates(pool_id: str) -> Response:
        return _updates(state, lambda: state.get_worker_pool(pool_id), WORKER_POOL_FINAL)

    @router.get("/workerPools/{pool_id}")
    def get_worker_pool(pool_id: str) -> Any:
        return state.get_worker_pool(pool_id)

    @router.delete("/workerPools/{pool_id}")
    def shut_down_worker_pool(pool_id: str) -> Response:
        state.shut_down_worker_pool(pool_id)
        return Response(status_code=200)

    @router.get("/workerPools/{namespace}/{name:path}")
    def get_worker_pool_by_name(namespace: str, name: str) -> Any:
        return state.get_worker_pool_by_name(namespace, name)


def _compute_routes(router: APIRouter, state: PlatformState) -> None:
    @router.get("/compute/requirements")
    def search_compute_requirements(request: Request) -> Any:
        return state.search_compute_requirements(params(request))

    @router.put("/compute/requirements")
    async def update_compute_requirement(request: Request, reprovision: str | None = None) -> Any:
        document = await object_body(request, "ComputeRequirement")
        return state.update_compute_requirement(document, flag(reprovision))

    @router.get("/compute/requirements/{requirement_id}")
    def get_compute_requirement(requirement_id: str) -> Any:
        return state.get_compute_requirement(requirement_id)

    @router.get("/compute/requirements/{requirement_id}/updates")
    def compute_requirement_updates(requirement_id: str) -> Response:
        return _updates(state, lambda: state.get_compute_requirement(requirement_id), COMPUTE_FINAL)

    @router.put("/compute/requirements/{requirement_id}/transition/{status}")
    def transition_compute_requirement(requirement_id: str, status: str) -> Any:
        return state.transition_compute_requirement(requirement_id, status)

    @router.get("/compute/namespaces/{namespace}/requirements/{name:path}")
    def get_compute_requirement_by_name(namespace: str, name: str) -> Any:
        return state.get_compute_requirement_by_name(namespace, name)

    @router.get("/compute/instances")
    def search_instances(request: Request) -> Any:
        return state.search_instances(params(request))

    @router.put("/compute/requirements/{requirement_id}/instances/transition/{status}")
    async def transition_instances(requirement_id: str, status: str, request: Request) -> Response:
        instance_ids = await json_list(request, "InstanceId")
        state.transition_instances(requirement_id, status, instance_ids)
        return Response(status_code=200)

    @router.put("/compute/requirements/{requirement_id}/instances/deprovision")
    async def deprovision_instances(requirement_id: str, request: Request) -> Response:
        instance_ids = await json_list(request, "InstanceId")
        state.transition_instances(requirement_id, "TERMINATED", instance_ids, deprovision=True)
        return Response(status_code=200)



def _control_routes(
    router: APIRouter, state: PlatformState, faults: FaultPlan, api_calls: ApiCalls
) -> None:
    @router.post("/faults", status_code=201)
    async def add_fault(request: Request) -> Any:
        body = await object_body(request, "fault")
        try:
            fault = faults.add(
                body.get("kind", ""),
                path=body.get("path", "*"),
                method=body.get("method", "*"),
                count=int(body.get("count", 1)),
                retry_after_s=body.get("retryAfterSeconds"),
            )
        except (ValueError, TypeError) as error:
            raise InvalidRequest(
                f"Fault: {error}; kind is one of {[kind.value for kind in FaultKind]}"
            ) from None
        return fault.to_wire()

    @router.delete("/faults")
    def clear_faults() -> Response:
        faults.clear()
        state.clear_boot_failures()
        return Response(status_code=204)

    @router.post("/nodes/{node_id}/kill", status_code=204)
    def kill_node(node_id: str) -> Response:
        state.kill_node(node_id)
        return Response(status_code=204)

    @router.post("/boot-failures", status_code=204)
    async def fail_node_boot(request: Request) -> Response:
        body = await json_body(request) or {}
        state.fail_node_boot(int(body.get("count", 1)), body.get("workerPoolId"))
        return Response(status_code=204)

    @router.get("/live")
    def live() -> Any:
        return state.live_entities()

    @router.get("/api-calls")
    def get_api_calls() -> Any:
        return api_calls.snapshot()

    @router.delete("/api-calls")
    def reset_api_calls() -> Response:
        api_calls.reset()
        return Response(status_code=204)

    @router.get("/tasks/{task_id}/output")
    def task_output(task_id: str) -> Response:
        return PlainTextResponse(state.task_output(task_id))
