"""Run by a head node's task script: ends the node task once no Ray driver has been connected
for a grace period, so a cluster whose driver died (and took its teardown with it) ends itself.

    python3 -m prefect_raydog.scripts.driver_watch GCS_ADDRESS TASK_PID

The task runner sets, in the head task's environment, `RAYDOG_DRIVERLESS_GRACE_S` (seconds with
no driver, after the last one left, before the task ends) and `RAYDOG_FIRST_DRIVER_WITHIN_S`
(seconds the first driver may take to connect). Drivers are the jobs in the GCS job table,
Ray's internal ones aside (as KubeRay's idle termination counts them); a Ray Client connection
is one job. The task ends by SIGTERM to TASK_PID, its script, which exits: the head's Ray goes
with it, its workers lose their head and end their own tasks. Imports only Ray."""

from __future__ import annotations

import os
import signal
import sys
import time

_POLL_S = 2.0


def drivers(gcs: object) -> tuple[int, int] | None:
    """Live and ended driver jobs in the GCS job table, or None when the GCS does not answer."""
    from ray._raylet import RAY_INTERNAL_NAMESPACE_PREFIX

    try:
        jobs = gcs.get_all_job_info(  # type: ignore[attr-defined]
            skip_submission_job_info_field=True, skip_is_running_tasks_field=True
        )
    except Exception:  # noqa: BLE001 - a GCS that does not answer counts as drivers present
        return None
    user_jobs = [
        job
        for job in jobs.values()
        if not job.config.ray_namespace.startswith(RAY_INTERNAL_NAMESPACE_PREFIX)
    ]
    live = sum(1 for job in user_jobs if not job.is_dead)
    return live, len(user_jobs) - live


def wait_until_driverless(gcs_address: str, grace_s: float, first_within_s: float) -> str:
    """Return, with the reason, once no driver has been connected for `grace_s` after one was,
    or none connected within `first_within_s`."""
    from ray._raylet import GcsClient

    gcs = GcsClient(address=gcs_address)
    started = alone_since = time.monotonic()
    seen = False
    while True:
        now, counts = time.monotonic(), drivers(gcs)
        if counts is None or counts[0]:
            alone_since = now
        seen = seen or bool(counts and sum(counts))
        if seen and now - alone_since >= grace_s:
            return f"No Ray driver has been connected for {grace_s:g} s: ending the cluster."
        if not seen and now - started >= first_within_s:
            return f"No Ray driver connected within {first_within_s:g} s: ending the cluster."
        time.sleep(_POLL_S)


def main(argv: list[str]) -> None:
    gcs_address, task_pid = argv[1], int(argv[2])
    grace_s = float(os.environ["RAYDOG_DRIVERLESS_GRACE_S"])
    first_within_s = float(os.environ.get("RAYDOG_FIRST_DRIVER_WITHIN_S", "600"))
    print(wait_until_driverless(gcs_address, grace_s, first_within_s), file=sys.stderr, flush=True)
    os.kill(task_pid, signal.SIGTERM)


if __name__ == "__main__":
    main(sys.argv)
