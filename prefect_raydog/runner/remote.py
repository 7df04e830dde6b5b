"""The Ray remote functions the runner sends to the nodes, what they carry and what they return.

Imports neither Prefect nor the rest of the runner at module level: over Ray Client, the head's
server unpickles every function, argument and result it forwards, and importing Prefect there
cost each flow run's connection about 1.7 s of CPU on the head, and its first task as long. So a
task run's call travels as one pickled payload that only the worker opens (`dumps_with_refs`),
with the Ray object references it holds beside it, and its outcome as pickled bytes.
"""

from __future__ import annotations

import functools
import io
import pickle
from typing import Any

from prefect_raydog.runner.outcome import Outcome


def dumps_with_refs(value: Any) -> tuple[bytes, list[Any]]:
    """`value` pickled with cloudpickle (by-value modules included), each Ray object reference
    in it taken out into the returned list, for Ray to forward as a reference."""
    buffer = io.BytesIO()
    refs: list[Any] = []
    _pickler_class()(buffer, refs).dump(value)
    return buffer.getvalue(), refs


def loads_with_refs(payload: bytes, refs: list[Any]) -> Any:
    """The value `dumps_with_refs` pickled, with its object references put back."""
    return _RefUnpickler(io.BytesIO(payload), refs).load()


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, refs: list[Any]) -> None:
        super().__init__(file)
        self._refs = refs

    def persistent_load(self, pid: Any) -> Any:
        return self._refs[pid]


@functools.cache
def _pickler_class() -> type:
    """A CloudPickler that takes Ray object references out (made on first use: Ray is imported
    only where it is needed)."""
    import ray
    from ray import cloudpickle

    class RefPickler(cloudpickle.CloudPickler):
        def __init__(self, file: io.BytesIO, refs: list[Any]) -> None:
            super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
            self._refs = refs

        def persistent_id(self, obj: Any) -> int | None:
            if isinstance(obj, ray.ObjectRef):
                self._refs.append(obj)
                return len(self._refs) - 1
            return None

    return RefPickler


def run_task_run(call: bytes, refs: list[Any], context_box: list[Any], task_box: list[Any],
                 *upstream: Any) -> Outcome:
    """Run one Prefect task run in this Ray worker process. `upstream`: the references of the
    results its call waits for, given to Ray so that the task starts once they are done."""
    from prefect_raydog.runner.node import run_call

    return Outcome(*run_call(loads_with_refs(call, refs), context_box[0], task_box[0]))


def warm_process() -> None:
    """Import and set up, in this worker process, what a task run does on first use."""
    from prefect_raydog.runner.node import warm_this_process

    warm_this_process()


_WORKER_REMOTES: dict[str, Any] = {}


def remote_for(options: dict[str, Any], cache: dict[str, Any] | None = None) -> Any:
    """`run_task_run` as a Ray remote function with a task's `options`, kept in `cache` (on a
    node, this process's) by options.

    The options go to `ray.remote` as prefect-ray gives them, so each means what it means on
    `@ray.remote` (`max_calls` too, which `.options()` refuses); the task's name, the one option
    that differs per task, goes to `.options()` of the function decorated once for the rest."""
    import ray

    cache = _WORKER_REMOTES if cache is None else cache
    key = repr(sorted(options.items()))
    remote = cache.get(key)
    if remote is None:
        decorated = {name: value for name, value in options.items() if name != "name"}
        if "name" in options:
            remote = remote_for(decorated, cache).options(name=options["name"])
        else:
            remote = ray.remote(**{"max_retries": 0, **decorated})(run_task_run)
        cache[key] = remote
    return remote


def inside_ray_worker() -> bool:
    """Whether this process is a Ray worker (where a nested flow's runner submits directly)."""
    import ray

    if not ray.is_initialized() or ray.util.client.ray.is_connected():
        return False
    return ray._private.worker.global_worker.mode == ray._private.worker.WORKER_MODE
