"""The local platform's state: YellowDog's entities and their status machines (work
requirements, task groups, tasks, worker pools, nodes, compute requirements, instances), with no
HTTP in sight.

The rooms: `work`, `compute` and `actions` hold the entities and their wire forms, `search` the
queries and pages, `clock` the lock, timers and scheduler thread, `simulation` what the
scheduler does (claims, boot, idle shutdown and timeouts, node start and stop), and
`work_service`, `pool_service`, `instance_service` (stop, start, restart, reprovision,
instantiate), `node_action_service`, `catalogue_service` (templates, namespaces, the
application) and `controls` the operations the API's routes call. Everything is guarded by one
lock. A scheduler thread runs `step()` whenever something changes and at least every 50 ms for
timers: it boots nodes, lets idle workers claim waiting tasks, grows pools to meet waiting tasks,
and ends timed-out tasks and idle nodes and pools. Process nodes' processes are run by a
`NodeRunner`, always called outside the lock.

Choices where YellowDog's behaviour is not documented (contract section 5 and 9.1):
- Tasks are READY as soon as they are added. A worker that has no task is STOPPED (not
  claimed); while it runs a task it is RUNNING with the task's group as its claim.
- Aborted tasks (cancel with abort, pool shutdown) end ABORTED; tasks on a node that is killed
  or whose compute requirement is terminated end FAILED with an ALLOCATION_LOST error; a task
  that passes its timeout ends FAILED with a TIMED_OUT error. A process task keeps its status
  until its process has really ended.
- A task group with a FAILED task ends FAILED, otherwise COMPLETED; a work requirement ends
  FAILED when any of its groups failed, COMPLETED otherwise, CANCELLED when it was cancelled.
- A pool is idle (for `idlePoolShutdown`) when none of its nodes is booting or running a task;
  a node is idle (for `idleNodeShutdown`) from registration or from the end of its last task.
  Idle node shutdown never takes a pool below `minNodes`. A node that registers, or ends a
  task, while a task it matches waits takes that task before any idle timer can end the node
  or its pool, whatever the timeouts (0 s included), as on YellowDog.
- When several pools can serve one task group, each grows for all of its waiting tasks.
- `DELETE` of a pool that is already SHUTDOWN or TERMINATED, and terminating a compute
  requirement that is already TERMINATING or TERMINATED, succeed and change nothing: RayDog's
  own teardown issues both calls in both orders (contract 1.2), so the real platform must
  accept the second one.
- Searches page 100 items by default (`size` from 1 to 1000); slice ids are opaque offsets.
  Results come in creation order, or by `sortField` (a field of the returned documents);
  `sortDirection=DESCENDING` reverses either. Names, and the tags of work and compute
  requirements, match as substrings; an empty value is no filter; everything is healthy.
- A compute requirement's target is set by provisioning and resizing, follows its pool's growth
  and idle node stops, and keeps lost instances until a reprovision replaces them; alive
  instances are the PENDING or RUNNING ones.
- Stopping an instance fails its task (ALLOCATION_LOST) and ends its processes; its node is
  LOST until it starts again, with the same id and home. A compute requirement instantiated
  without a pool keeps its instances in a pool that is never shown, whose nodes never
  register a worker.
- Node actions run in order, one at a time per node, as commands in the node from its home;
  CREATE_WORKERS fails (one worker a node), and a failure stops the node's queue.
- `/updates` streams end once their entity has finished.
- Templates and their compute source templates have ids derived from `namespace/name`; the
  namespaces are those in use; the application reads them all.
- Only RUNNING or HELD work requirements can be updated (PUT); new task groups are appended.
- Resizing a pool adds nodes or stops idle ones, newest first; shutting down one node lets
  its task end first (the SDK documents it as graceful).
- Process nodes: a task whose process cannot be started ends FAILED (UNABLE_START_PROCESS).
- Duplicate names are refused only among live pools and unfinished work requirements.
"""

from prefect_raydog.local.state.catalogue_service import CatalogueService
from prefect_raydog.local.state.controls import Controls
from prefect_raydog.local.state.errors import (
    InvalidRequest,
    InvalidTransition,
    NotFound,
    PlatformError,
)
from prefect_raydog.local.state.instance_service import InstanceService
from prefect_raydog.local.state.node_action_service import NodeActionService
from prefect_raydog.local.state.work_service import WorkService

__all__ = [
    "InvalidRequest",
    "InvalidTransition",
    "NotFound",
    "PlatformError",
    "PlatformState",
]


class PlatformState(WorkService, InstanceService, NodeActionService, CatalogueService, Controls):
    """Every entity of the local platform, the scheduler that moves them along, and every
    operation the API calls."""
