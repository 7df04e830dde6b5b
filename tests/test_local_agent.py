"""The local platform's agent: bash tasks run like the YellowDog agent runs them, each node
isolated like a separate machine, aborts end whole process trees, and nothing is left behind.
First the agent on its own, then process nodes through the platform and the unmodified SDK."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_for
from process_nodes import (
    ABORT_GRACE_S,
    Footprint,
    Pools,
    bridge_leftovers,
    link_exists,
    node_networking,
    process_pools,
)
from yellowdog_client.model import NodeSearch, TaskStatus

from prefect_raydog.local import LocalPlatform
from prefect_raydog.local.agent import ProcessAgent
from prefect_raydog.local.network import BridgeNetwork, IsolationUnavailable
from prefect_raydog.local.nodes import TaskLaunch

PRINT_ENVIRONMENT = 'echo "node $(hostname) pid $$"; env | sort; exit {code}'
IGNORES_SIGTERM = 'trap "" TERM; (trap "" TERM; sleep 300) & sleep 300 & wait; wait'
RECORDS_SIGTERM = 'trap "echo got TERM" TERM; (trap "" TERM; sleep 300) & echo started; wait; wait'
"""Says whether it got a SIGTERM before the SIGKILL that ends it: `at once` means none."""


class Exits:
    """Collects `on_exit` calls by task id and checks each comes exactly once."""

    def __init__(self) -> None:
        self.codes: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def callback(self, task_id: str):
        def on_exit(code: int) -> None:
            with self._lock:
                self.codes.setdefault(task_id, []).append(code)
        return on_exit

    def wait(self, task_id: str, timeout: float = 20.0) -> int:
        codes = wait_for(lambda: self.codes.get(task_id), timeout, what=f"{task_id} to end")
        time.sleep(0.1)
        assert len(codes) == 1, f"on_exit called {len(codes)} times for {task_id}"
        return codes[0]


def launch(script: str, environment: dict[str, str] | None = None) -> TaskLaunch:
    task_id = f"ydid:task:000000:{uuid.uuid4()}:1"
    return TaskLaunch(task_id=task_id, task_type="bash", arguments=["taskdata.txt"],
                      task_data=script, environment={"YD_TASK_ID": task_id, **(environment or {})})


@pytest.fixture(params=["bridge", "loopback"])
def agent(request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[ProcessAgent]:
    """An agent on its own, with nodes on a bridge or on loopback, and a secret in the
    environment of the process that runs it."""
    if request.param == "bridge" and os.geteuid() != 0:
        pytest.skip("bridges need root")
    monkeypatch.setenv("PLATFORM_ONLY_SECRET", "must-not-reach-nodes")
    agent = ProcessAgent.create(tmp_path, request.param, abort_grace_s=ABORT_GRACE_S)
    bridge = getattr(agent.network, "bridge", None)
    try:
        yield agent
    finally:
        agent.close()
    assert agent.processes() == []
    if bridge is not None:
        assert bridge_leftovers(bridge, str(os.getpid())) == []


# ---- the agent on its own ----

def test_bash_task_runs_in_its_own_directory_with_a_clean_environment(
        agent: ProcessAgent, tmp_path: Path) -> None:
    agent.boot_node("ydid:node:000000:n1", "yd-node-one")
    exits, task = Exits(), launch(PRINT_ENVIRONMENT.format(code=0), {"MY_SETTING": "x y"})
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    assert exits.wait(task.task_id) == 0
    directory = (tmp_path / "nodes" / "ydid_node_000000_n1" / "agent" / "data" / "workers"
                 / task.task_id.replace(":", "_"))
    assert (directory / "taskdata.txt").read_text() == task.task_data
    output = agent.task_output(task.task_id)
    assert output == (directory / "taskoutput.txt").read_text()
    lines = output.splitlines()
    assert lines[0] == "node yd-node-one pid 1"
    environment = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    assert environment["MY_SETTING"] == "x y"
    assert environment["YD_TASK_ID"] == task.task_id
    assert environment["YD_AGENT_DATA"] == str(directory.parent.parent)
    assert environment["HOME"] == environment["YD_AGENT_HOME"]
    assert environment["USER"] == "yd-agent"
    assert environment["PWD"] == str(directory)
    assert "PLATFORM_ONLY_SECRET" not in environment
    assert "RAY_AUTH_MODE" not in environment


def test_nodes_have_private_tmp_and_hostnames_resolving_to_their_own_address(
        agent: ProcessAgent) -> None:
    exits = Exits()
    addresses = {}
    for node in ("n1", "n2"):
        addresses[node] = agent.boot_node(f"ydid:node:000000:{node}", f"yd-{node}")
    tasks = {node: launch('getent hosts "$(hostname)"; ls -A /tmp; touch /tmp/mark-$(hostname)')
             for node in addresses}
    for node, task in tasks.items():
        agent.run_task(f"ydid:node:000000:{node}", task, exits.callback(task.task_id))
        assert exits.wait(task.task_id) == 0
    for node, task in tasks.items():
        output = agent.task_output(task.task_id)
        assert output.split()[:2] == [addresses[node].private_ip, f"yd-{node}"]
        assert "mark-" not in output
    assert not list(Path("/tmp").glob("mark-yd-n*"))
    if agent.network.mode == "bridge":
        assert addresses["n1"].private_ip != addresses["n2"].private_ip
        for address in addresses.values():  # each on its own network
            assert address.public_ip.split(".")[:3] != address.private_ip.split(".")[:3]


def test_non_zero_exit_code_is_reported_once(agent: ProcessAgent) -> None:
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    exits, task = Exits(), launch("echo failing >&2; exit 3")
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    assert exits.wait(task.task_id) == 3
    assert agent.task_output(task.task_id) == "failing\n"


def test_abort_runs_the_exit_trap_and_ends_the_whole_tree(agent: ProcessAgent) -> None:
    # A grace no load outlasts: the SIGKILL after it must not beat the SIGTERM to the task.
    agent.abort_grace_s = 30
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    exits = Exits()
    task = launch('trap "echo trap ran" EXIT; sleep 300 & sleep 300 & echo started; wait')
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    wait_for(lambda: "started" in agent.task_output(task.task_id), what="the task to start")
    assert len(agent.processes()) >= 4
    agent.abort_task(task.task_id)
    # Ended by the SIGTERM, not by the SIGKILL that would come after the grace (-9).
    assert exits.wait(task.task_id) in (143, -15)
    assert "trap ran" in agent.task_output(task.task_id)
    assert agent.processes() == []


def test_a_second_abort_or_node_stop_does_not_cut_the_exit_trap_short(
        agent: ProcessAgent) -> None:
    # The trap's 0.5 s must end well within the grace even on 2 loaded cores, or the SIGKILL
    # after the grace (not a second SIGTERM) would cut it short. The task traps TERM, as the
    # node scripts do, and its sleep runs before "started": a SIGTERM between the echo and a
    # foreground sleep's start would be left pending for the sleep's 300 s.
    agent.abort_grace_s = 30
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    exits = Exits()
    task = launch('trap "sleep 0.5; echo trap finished" EXIT; trap "exit 143" TERM; '
                  'sleep 300 & echo started; wait')
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    wait_for(lambda: "started" in agent.task_output(task.task_id), what="the task to start")
    agent.abort_task(task.task_id)
    agent.abort_task(task.task_id)
    agent.stop_node("ydid:node:000000:n1")
    assert exits.wait(task.task_id) == 143
    assert agent.task_output(task.task_id).endswith("trap finished\n")


def test_abort_kills_a_tree_that_ignores_sigterm_after_the_grace_period(
        agent: ProcessAgent) -> None:
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    exits, task = Exits(), launch(IGNORES_SIGTERM)
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    wait_for(lambda: len(agent.processes()) >= 4, what="the task's tree to start")
    started = time.monotonic()
    agent.abort_task(task.task_id)
    agent.abort_task(task.task_id)
    assert exits.wait(task.task_id) == -9
    assert time.monotonic() - started >= ABORT_GRACE_S
    assert agent.processes() == []


def test_killing_a_node_ends_its_tasks_at_once_and_leaves_other_nodes_running(
        agent: ProcessAgent) -> None:
    exits = Exits()
    tasks = {"n2": launch(IGNORES_SIGTERM), "n1": launch(RECORDS_SIGTERM)}
    for node, task in tasks.items():
        agent.boot_node(f"ydid:node:000000:{node}", f"yd-{node}")
        agent.run_task(f"ydid:node:000000:{node}", task, exits.callback(task.task_id))
        wait_for(lambda: len(agent.processes()) >= 4, what="the tree to start")
    wait_for(lambda: "started" in agent.task_output(tasks["n1"].task_id), what="n1 to start")
    agent.stop_node("ydid:node:000000:n1", kill=True)
    assert exits.wait(tasks["n1"].task_id) == -9
    assert "got TERM" not in agent.task_output(tasks["n1"].task_id)
    assert tasks["n2"].task_id not in exits.codes
    agent.stop_node("ydid:node:000000:n1", kill=True)
    agent.stop_node("ydid:node:000000:n2")
    assert exits.wait(tasks["n2"].task_id) == -9


def test_task_on_a_stopped_node_ends_as_killed(agent: ProcessAgent) -> None:
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    agent.stop_node("ydid:node:000000:n1")
    exits, task = Exits(), launch("exit 0")
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    assert exits.wait(task.task_id) == -9


def test_unsupported_task_type_fails_with_a_message(agent: ProcessAgent) -> None:
    agent.boot_node("ydid:node:000000:n1", "yd-n1")
    exits = Exits()
    task = TaskLaunch(task_id="ydid:task:000000:x:1", task_type="docker", arguments=[],
                      task_data=None)
    agent.run_task("ydid:node:000000:n1", task, exits.callback(task.task_id))
    assert exits.wait(task.task_id) == 127
    assert "'docker' is not supported" in agent.task_output(task.task_id)


def test_unknown_network_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="'wifi'"):
        ProcessAgent.create(Path("/nonexistent"), "wifi")


def test_a_machine_that_cannot_isolate_nodes_refuses_them_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(IsolationUnavailable, match="refuses: .*'unshare'.*bridge is not possible"):
        ProcessAgent.create(tmp_path, "auto")


@pytest.mark.skipif(os.geteuid() != 0, reason="bridges need root")
def test_concurrent_bridges_get_distinct_subnets_and_leave_nothing() -> None:
    first, second = BridgeNetwork(), BridgeNetwork()
    try:
        assert first.bridge != second.bridge
        assert not first.subnet.overlaps(second.subnet)
        started = time.monotonic()
        sandbox = first.add_node("yd-timing")
        # A guard against per-node work taking seconds (it takes about 50 ms), not a benchmark:
        # wide, because other agents' tests on the 2 shared cores stall any process at times.
        assert time.monotonic() - started < 5
        assert sandbox.name in node_networking(first.bridge)
    finally:
        first.close()
        second.close()
    for network in (first, second):
        assert bridge_leftovers(network.bridge, str(os.getpid())) == []


NODE_LISTENS = """{python} -c '
import socket
servers = [socket.create_server(("0.0.0.0", port)) for port in ({open_port}, {closed_port})]
print("listening", flush=True)
while True:
    servers[0].accept()[0].close()
'"""
"""Listens on a port the host may reach and on one it may not."""

CONNECTS = """for target in {targets}; do
    if (exec 3<>"/dev/tcp/${{target/:/\\/}}") 2>/dev/null; then echo "$target open"
    else echo "$target closed"; fi
done"""


@pytest.mark.skipif(os.geteuid() != 0, reason="bridges need root")
def test_behind_the_firewall_nodes_reach_the_host_on_its_open_ports_alone_and_it_theirs(
        tmp_path: Path) -> None:
    node_open, node_closed = 2222, 7000
    agent = ProcessAgent.create(tmp_path, "bridge")
    host, private_host = agent.host_address, agent.network.private_host_address
    try:
        with (socket.create_server((host, 0)) as open_, socket.create_server((host, 0)) as closed,
              socket.create_server((private_host, 0)) as private):
            host_open, host_closed, private_port = (
                server.getsockname()[1] for server in (open_, closed, private))
            agent.close_host((host_open, private_port), (node_open,))
            listener = agent.boot_node("ydid:node:000000:n1", "yd-n1")
            agent.boot_node("ydid:node:000000:n2", "yd-n2")
            exits = Exits()
            listens = launch(NODE_LISTENS.format(python=sys.executable, open_port=node_open,
                                                 closed_port=node_closed))
            agent.run_task("ydid:node:000000:n1", listens, exits.callback(listens.task_id))
            wait_for(lambda: "listening" in agent.task_output(listens.task_id), 30,
                     what="the node's listeners")
            targets = [f"{host}:{host_open}", f"{host}:{host_closed}",
                       f"{private_host}:{private_port}", f"{listener.private_ip}:{node_closed}",
                       f"{listener.public_ip}:{node_open}", f"{listener.public_ip}:{node_closed}"]
            connects = launch(CONNECTS.format(targets=" ".join(targets)))
            agent.run_task("ydid:node:000000:n2", connects, exits.callback(connects.task_id))
            assert exits.wait(connects.task_id) == 0
            assert agent.task_output(connects.task_id).split("\n")[:6] == [
                f"{host}:{host_open} open", f"{host}:{host_closed} closed",
                f"{private_host}:{private_port} closed",  # the host is not on the cluster network
                f"{listener.private_ip}:{node_closed} open",  # the nodes' own network is open
                # A node's public address is behind its security group for nodes too.
                f"{listener.public_ip}:{node_open} open",
                f"{listener.public_ip}:{node_closed} closed"]
            socket.create_connection((listener.public_ip, node_open), timeout=10).close()
            # A security group drops the rest: no answer at all.
            for address, port in ((listener.public_ip, node_closed),
                                  (listener.private_ip, node_open)):
                with pytest.raises(TimeoutError):
                    socket.create_connection((address, port), timeout=2)
    finally:
        agent.close()
    assert agent.processes() == []


CRASHING_PLATFORM = """
import subprocess, sys, time
from prefect_raydog.local.network import BridgeNetwork
network = BridgeNetwork()
sandbox = network.add_node("yd-orphan")
subprocess.Popen(["ip", "netns", "exec", sandbox.name, "sleep", "300"], start_new_session=True)
print(network.bridge, sandbox.name, network.reaper.pid, flush=True)
time.sleep(300)
"""
"""A bridge with one node that runs a process which would outlive the platform by itself."""


def _crash_a_platform(kill_its_reaper: bool) -> Footprint:
    """SIGKILL a process that holds a bridge with a node (and its reaper if asked); what it had."""
    crashing = subprocess.Popen([sys.executable, "-c", CRASHING_PLATFORM], stdout=subprocess.PIPE,
                                text=True)
    try:
        bridge, namespace, reaper = crashing.stdout.readline().split()
        wait_for(lambda: subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                        text=True).stdout.split(), what="the node's process")
        assert link_exists(bridge) and len(node_networking(bridge)) == 2
        footprint = Footprint.of(crashing.pid)
        assert footprint.bridge == bridge
        if kill_its_reaper:
            os.kill(int(reaper), signal.SIGKILL)
    finally:
        crashing.kill()
        crashing.wait()
    return footprint


@pytest.mark.skipif(os.geteuid() != 0, reason="bridges need root")
def test_a_platform_killed_with_sigkill_leaves_nothing_once_its_reaper_is_done() -> None:
    _crash_a_platform(kill_its_reaper=False).wait_gone(time.monotonic(), timeout=30)


@pytest.mark.skipif(os.geteuid() != 0, reason="bridges need root")
def test_leftovers_of_a_platform_that_died_with_its_reaper_are_removed_by_the_next_one() -> None:
    crashed = _crash_a_platform(kill_its_reaper=True)
    BridgeNetwork().close()
    assert bridge_leftovers(crashed.bridge, crashed.bridges[crashed.bridge]) == []


# ---- process nodes through the platform and the SDK ----

@pytest.fixture
def pools(platform: LocalPlatform) -> Iterator[Pools]:
    with process_pools(platform) as workspace:
        yield workspace


def test_pool_of_two_process_nodes_reports_exit_codes_as_yellowdog_does(
        pools: Pools, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLATFORM_ONLY_SECRET", "must-not-reach-nodes")
    pools.wait_idle(pools.provision(2, "env"))
    ok, failing = pools.run("env", [PRINT_ENVIRONMENT.format(code=0),
                                    PRINT_ENVIRONMENT.format(code=3)], {"MY_SETTING": "1"})
    ok = pools.wait_task(ok.id, TaskStatus.COMPLETED)
    failing = pools.wait_task(failing.id, TaskStatus.FAILED)
    error = failing.errors[0]
    assert error.errorType == "PROCESS_NON_ZERO_EXIT" and error.processExitCode == 3
    outputs = [pools.platform.task_output(task.id) for task in (ok, failing)]
    hosts = {output.split()[1] for output in outputs}
    assert len(hosts) == 2, "each task ran on its own node"
    for task, output in zip((ok, failing), outputs, strict=True):
        environment = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
        assert environment["YD_TASK_ID"] == task.id
        assert environment["YD_TASK_GROUP_ID"] == task.taskGroupId
        assert {"YD_INSTANCE_ID", "YD_AGENT_HOME", "YD_AGENT_DATA"} <= environment.keys()
        assert environment["MY_SETTING"] == "1"
        assert "PLATFORM_ONLY_SECRET" not in environment
    nodes = pools.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pools.pool_ids[0]))
    assert {node.details.hostname for node in nodes} == hosts


def test_cancelling_with_abort_kills_a_task_tree_that_ignores_sigterm(pools: Pools) -> None:
    pools.wait_idle(pools.provision(1, "abort"))
    task = pools.run("abort", [IGNORES_SIGTERM])[0]
    pools.wait_task(task.id, TaskStatus.EXECUTING)
    wait_for(lambda: len(pools.platform.live_entities()["processes"]) >= 4,
             what="the task's tree to start")
    started = time.monotonic()
    pools.client.work_client.cancel_task_by_id(task.id, True)
    pools.wait_task(task.id, TaskStatus.ABORTED)
    # Generous: the grace plus whatever 2 shared cores take; the lower bound below is the point.
    wait_for(lambda: not pools.platform.live_entities()["processes"], ABORT_GRACE_S + 30,
             what="the task's processes to end")
    assert time.monotonic() - started >= ABORT_GRACE_S


def test_killing_a_process_node_ends_its_processes_at_once(pools: Pools) -> None:
    pool_id = pools.provision(1, "kill")
    pools.wait_idle(pool_id)
    task = pools.run("kill", [RECORDS_SIGTERM])[0]
    pools.wait_task(task.id, TaskStatus.EXECUTING)
    wait_for(lambda: "started" in pools.platform.task_output(task.id), what="the task to start")
    node = pools.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool_id))[0]
    pools.platform.kill_node(node.id)
    wait_for(lambda: not pools.platform.live_entities()["processes"], 30,
             what="the node's processes to die")
    assert "got TERM" not in pools.platform.task_output(task.id)
    failed = pools.wait_task(task.id, TaskStatus.FAILED)
    assert failed.errors[-1].errorType == "ALLOCATION_LOST"
