"""Flow scripts that tests run in a subprocess of their own, to signal or kill it."""

LONG_FLOW = """
import pathlib, sys, time
from prefect import flow, task
from prefect.runtime import flow_run
from prefect_raydog.task_runners import RayDogTaskRunner

@task
def sleepy(x):
    time.sleep(600)

@flow(task_runner=RayDogTaskRunner(cluster=sys.argv[1]))
def long_flow():
    futures = sleepy.map(range(2))
    pathlib.Path(sys.argv[2]).write_text(flow_run.id)
    futures.wait()

long_flow()
"""
"""Maps two tasks that sleep for ten minutes; writes its flow run id to argv[2] once they are
submitted. Its arguments: the cluster block's name (a sealed one: the nodes reach the Prefect API
through the SSH connection), the marker file."""

LOCAL_PRESET_FLOW = """
import pathlib, sys, time
from prefect import flow, task
from prefect_raydog.task_runners import RayDogTaskRunner

@task
def sleepy(x):
    time.sleep(600)

@flow(task_runner=RayDogTaskRunner())
def local_preset_flow():
    futures = sleepy.map(range(2))
    pathlib.Path(sys.argv[1]).write_text("submitted")
    futures.wait()

local_preset_flow()
"""
"""LONG_FLOW on the `local` preset: the platform runs inside the flow process. Its argument: the
marker file written once the tasks are submitted (so after the workers joined)."""
