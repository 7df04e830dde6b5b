"""The local platform's agent: runs each process node's `bash` tasks the way the YellowDog agent
does, inside the node's own namespaces so that nodes on one machine act like separate machines."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from prefect_raydog.local import machine, ssh
from prefect_raydog.local.images import Image, ImageBuildError, ensure_bare_image, ensure_image
from prefect_raydog.local.network import NodeNetwork, NodeSandbox, open_network
from prefect_raydog.local.nodes import NodeAddress, NodeBootError, NodeImage, TaskLaunch

TASK_TYPES = {"bash": "/bin/bash"}
"""The run command of each task type, as in the YellowDog agent's `application.yaml`."""

AGENT_USER = machine.AGENT_USER
USERDATA_EXIT = "userdata exit status: "
USERDATA_DONE = f"{USERDATA_EXIT}0\n"
ROOT_ENVIRONMENT = {"HOME": "/root", "USER": "root", "LOGNAME": "root"}

DIE_WITH_PLATFORM = ("setpriv", "--pdeathsig", "KILL", "--",
                     "/bin/sh", "-c", 'test "$PPID" = "$0" && exec "$@"')
"""Prefix (then the platform's PID) of a task's command: the kernel SIGKILLs the task's first
process when the platform's thread that started it ends, however the platform dies, and the
check after it closes the race with a platform that died first. That process becomes the
`unshare` whose PID namespace ends with it (`--kill-child`), so the whole task tree goes. Not
`preexec_fn`: Python code between fork and exec can hang in a process with gRPC threads (a
flow's Ray client)."""

ENTER_NODE = r"""
set -e
hostname "$1"
if [ -n "$2" ]; then mount --bind "$2" /etc/hosts; fi
private_tmp="$3"
cd "$4" && unset OLDPWD
shift 4
while [ "$1" != "--" ]; do
    mkdir -p "$private_tmp${1#/tmp}" && mount --bind "$1" "$private_tmp${1#/tmp}"
    shift
done
shift
mount --rbind "$private_tmp" /tmp
exec "$@"
"""
"""Runs first inside a task's fresh namespaces: sets the hostname, puts the node's hosts file and
private /tmp in place (keeping visible the host paths under /tmp listed before `--`), then
becomes the task's command. Any failure ends the task rather than run it unisolated."""


IMAGE_PATHS = [Path(p) for p in {sys.prefix, sys.base_prefix, *sys.path} if p] + [
    Path(__file__).resolve().parents[2]]
"""What a node's machine image holds: the Python and packages the platform itself runs from.
A node must keep seeing them even when they lie under the /tmp it replaces (a checkout or
virtual environment under /tmp)."""


def _under_tmp(paths: list[Path]) -> list[str]:
    """The existing paths under /tmp, outermost only, that a node's private /tmp must keep."""
    inside = sorted({p.resolve() for p in paths if p.resolve().is_relative_to("/tmp")
                     and p.resolve() != Path("/tmp") and p.exists()})
    kept: list[Path] = []
    for path in inside:
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return [str(p) for p in kept]


@dataclass
class _Node:
    sandbox: NodeSandbox
    root: Path
    tasks: set[str] = field(default_factory=set)
    sshd: subprocess.Popen[bytes] | None = None
    image: Image | None = None
    user: pwd.struct_passwd | None = None
    """The agent user tasks run as on a sealed node (one with an image); None: as root."""

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def agent_data(self) -> Path:
        return self.root / "agent" / "data"

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"


@dataclass
class _Task:
    task_id: str
    node_id: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    aborted: bool = False
    ended: threading.Event = field(default_factory=threading.Event)


class ProcessAgent:
    """A `NodeRunner` that runs every node's tasks as real processes on this machine."""

    def __init__(self, data_dir: Path, network: NodeNetwork, abort_grace_s: float = 10.0) -> None:
        self.data_dir = data_dir
        self.network = network
        self.host_address = network.host_address
        self.package_index: str | None = None
        self.abort_grace_s = abort_grace_s
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._tasks: dict[str, _Task] = {}
        self._booting: dict[str, subprocess.Popen[bytes]] = {}
        self._aborting_boots = False

    @classmethod
    def create(cls, data_dir: Path, network: str = "auto", abort_grace_s: float = 10.0,
               bridge_index: int | None = None) -> ProcessAgent:
        """An agent for nodes on a `network` ("auto", "bridge" or "loopback"; the bridge numbered
        `bridge_index` if free); raises `IsolationUnavailable` saying why when this machine
        cannot isolate nodes."""
        return cls(Path(data_dir), open_network(network, bridge_index), abort_grace_s)

    def close_host(self, host_ports: tuple[int, ...], node_ports: tuple[int, ...]) -> None:
        self.network.close_host(host_ports, node_ports)

    def boot_node(self, node_id: str, hostname: str, user_data: str | None = None,
                  image: NodeImage | None = None) -> NodeAddress:
        with self._lock:
            if node_id in self._nodes:
                raise NodeBootError(f"node {node_id} is already booted")
        built, user = self._image(image), machine.agent_user() if image else None
        node = _Node(sandbox=self.network.add_node(hostname), root=self._root(node_id),
                     image=built, user=user)
        try:
            self._make_directories(node)
        except OSError as error:
            self.network.remove_node(node.sandbox)
            raise NodeBootError(
                f"cannot create the directories of node {node_id}: {error}") from error
        # As cloud-init's scripts, once per instance: not again when a stopped one starts.
        if image is not None and user_data and USERDATA_DONE not in self.boot_output(node_id):
            self._run_userdata(node_id, node, user_data)
        keys = ssh.authorized_keys(user_data)
        if keys and node.sandbox.enter_sharing_pids:
            self._start_sshd(node, keys)
        with self._lock:
            self._nodes[node_id] = node
        return NodeAddress(private_ip=node.sandbox.address, public_ip=node.sandbox.public_address,
                           hostname=hostname)

    def _root(self, node_id: str) -> Path:
        return (self.data_dir / "nodes" / _file_name(node_id)).resolve()

    @staticmethod
    def _image(image: NodeImage | None) -> Image | None:
        if image is None:
            return None
        try:
            return ensure_bare_image() if image.bare else ensure_image(image.packages)
        except (ImageBuildError, OSError, subprocess.SubprocessError) as error:
            raise NodeBootError(f"cannot build the node's image: {error}") from error

    def _make_directories(self, node: _Node) -> None:
        for directory in (node.home, node.tmp, node.agent_data / "workers"):
            directory.mkdir(parents=True, exist_ok=True)
        node.tmp.chmod(0o1777)
        if not node.sandbox.hosts_file_in_netns:
            node.hosts_file.write_text(
                f"127.0.0.1 localhost\n{node.sandbox.address} {node.sandbox.hostname}\n")
        if node.user is not None:
            node.passwd.write_text(machine.passwd_file(node.user, node.home))
            (node.home / ".ssh").mkdir(mode=0o700, exist_ok=True)
            for directory in (node.home, node.home / ".ssh", node.agent_data / "workers"):
                os.chown(directory, node.user.pw_uid, node.user.pw_gid)

    def _run_userdata(self, node_id: str, node: _Node, user_data: str) -> None:
        """Run the userdata as root inside the node, as cloud-init does at a VM's first boot;
        its output and exit status go to the node's boot output. Failing, the node does not
        boot."""
        script = node.root / "userdata"
        script.write_text(user_data)
        script.chmod(0o700)
        command = [str(script)] if user_data.startswith("#!") else ["/bin/bash", str(script)]
        output_path = node.root / "boot-output.txt"
        with output_path.open("ab") as output:
            process = subprocess.Popen(
                [*DIE_WITH_PLATFORM, str(os.getpid()),
                 *self._enter(node, node.root, command, node.sandbox.enter, as_root=True)],
                cwd=node.root, env=self._environment(node, ROOT_ENVIRONMENT),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)
            with self._lock:
                self._booting[node_id] = process
                aborting = self._aborting_boots
            if aborting:
                _signal_group(process, signal.SIGKILL)
            try:
                code = process.wait(machine.USERDATA_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                code = process.wait()
            finally:
                with self._lock:
                    self._booting.pop(node_id, None)
            output.write(f"{USERDATA_EXIT}{code}\n".encode())
        if code != 0:
            self.network.remove_node(node.sandbox)
            tail = output_path.read_text(errors="replace").strip().splitlines()[-10:]
            raise NodeBootError(
                f"the userdata of node {node_id} failed (exit {code}); its output ends: "
                + " | ".join(tail))

    def boot_output(self, node_id: str) -> str:
        try:
            return (self._root(node_id) / "boot-output.txt").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _start_sshd(self, node: _Node, keys: list[str]) -> None:
        """Accept SSH on the node's addresses, as a VM booted with these keys does."""
        # A host-Python node's image is the platform's Python, first on a login's PATH.
        path = (machine.image_path(node.image) if node.image is not None else
                f"{Path(sys.executable).parent}:{os.environ.get('PATH', os.defpath)}")
        as_user = (machine.login_as_agent(node.user, node.passwd) if node.user is not None
                   else [])
        try:
            owner = (node.user.pw_uid, node.user.pw_gid) if node.user is not None else None
            config = ssh.prepare(node.root, node.home, keys,
                                 ssh.host_key(self.data_dir), path, as_user, owner)
            log = node.root / "sshd.log"
            # Host PIDs stay visible to sshd, so that a login can join a task's PID namespace.
            node.sshd = ssh.start(
                self._enter(node, node.home, [], node.sandbox.enter_sharing_pids, as_root=True),
                node.root, config, log)
            ssh.wait_listening(node.sandbox.public_address, node.sshd, log)
        except (OSError, subprocess.CalledProcessError) as error:
            self.network.remove_node(node.sandbox)
            raise NodeBootError(f"cannot start the SSH server of a node: {error}") from error

    def run_task(self, node_id: str, launch: TaskLaunch, on_exit: Callable[[int], None]) -> None:
        with self._lock:
            node = self._nodes.get(node_id)
            if node is None:
                threading.Thread(target=on_exit, args=(-signal.SIGKILL,), daemon=True).start()
                return
            directory = node.agent_data / "workers" / _file_name(launch.task_id)
            task = _Task(task_id=launch.task_id, node_id=node_id, directory=directory)
            node.tasks.add(launch.task_id)
            self._tasks[launch.task_id] = task
        threading.Thread(target=self._run, args=(node, launch, task, on_exit),
                         name=f"task {launch.task_id}", daemon=True).start()

    def _run(self, node: _Node, launch: TaskLaunch, task: _Task,
             on_exit: Callable[[int], None]) -> None:
        try:
            code = self._execute(node, launch, task)
        except OSError as error:
            code = 127
            with contextlib.suppress(OSError), (task.directory / "taskoutput.txt").open("a") as out:
                out.write(f"The agent could not start the task: {error}\n")
        finally:
            task.ended.set()
            with self._lock:
                node.tasks.discard(launch.task_id)
        on_exit(code)

    def _execute(self, node: _Node, launch: TaskLaunch, task: _Task) -> int:
        task.directory.mkdir(parents=True, exist_ok=True)
        if node.user is not None:
            os.chown(task.directory, node.user.pw_uid, node.user.pw_gid)
        output_path = task.directory / "taskoutput.txt"
        with output_path.open("ab") as output:
            run_command = TASK_TYPES.get(launch.task_type)
            if run_command is None:
                output.write(f"Task type {launch.task_type!r} is not supported by this node "
                             f"(supported: {', '.join(TASK_TYPES)})\n".encode())
                return 127
            if launch.task_data is not None:
                (task.directory / "taskdata.txt").write_text(launch.task_data)
            with self._lock:
                if task.aborted:
                    return -signal.SIGTERM
                task.process = subprocess.Popen(
                    [*DIE_WITH_PLATFORM, str(os.getpid()),
                     *self._enter(node, task.directory, [run_command, *launch.arguments],
                                  node.sandbox.enter)],
                    cwd=task.directory, env=self._environment(node, launch.environment),
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                    start_new_session=True)
            if node.sshd is not None:
                ssh.publish_task(node.root, task.process)
            return task.process.wait()

    def _enter(self, node: _Node, directory: Path, command: list[str],
               enter: tuple[str, ...], as_root: bool = False) -> list[str]:
        """`command` run in `directory` inside the node, entered through the `enter` prefix; on
        a sealed node as the agent user unless `as_root`."""
        sandbox = node.sandbox
        hosts = "" if sandbox.hosts_file_in_netns else str(node.hosts_file)
        if node.image is not None and node.user is not None:
            user = [] if as_root else machine.as_agent(node.user)
            keep = _under_tmp([node.root])
            command = [*machine.seal(node.image, node.passwd, node.root), *user, *command]
        else:
            keep = _under_tmp([node.root, *IMAGE_PATHS])
        return [*enter, "/bin/bash", "-c", ENTER_NODE, "enter-node", sandbox.hostname, hosts,
                str(node.tmp), str(directory), *keep, "--", *command]

    def _environment(self, node: _Node, environment: dict[str, str]) -> dict[str, str]:
        """A fresh machine's agent service environment: nothing of the platform's own."""
        path = (machine.image_path(node.image) if node.image is not None
                else os.environ.get("PATH", os.defpath))
        return {
            "PATH": path,
            "HOME": str(node.home), "USER": AGENT_USER, "LOGNAME": AGENT_USER,
            "LANG": "C.UTF-8",
            **(self._image_environment() if node.image is not None else {}),
            **environment,
            "YD_AGENT_HOME": str(node.home), "YD_AGENT_DATA": str(node.agent_data),
        }

    def _image_environment(self) -> dict[str, str]:
        """What a sealed node's image sets for every process: the package index it installs
        from (pip wants a plain-http index named trusted)."""
        if self.package_index is None:
            return {}
        return {"PIP_INDEX_URL": self.package_index, "UV_DEFAULT_INDEX": self.package_index,
                "PIP_TRUSTED_HOST": urlsplit(self.package_index).hostname or ""}

    def abort_task(self, task_id: str) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is not None:
            self._end(task, signal.SIGTERM)

    def _end(self, task: _Task, signal_number: int) -> None:
        """Signal the task's process group once with SIGTERM (a second one would cut short its
        EXIT trap), then SIGKILL it if it outlives the grace; SIGKILL comes at once if asked."""
        with self._lock:
            first = not task.aborted
            task.aborted = True
            process = task.process
        if process is None or (signal_number == signal.SIGTERM and not first):
            return
        _signal_group(process, signal_number)
        if signal_number == signal.SIGTERM:
            threading.Thread(target=self._kill_after_grace, args=(task,), daemon=True).start()

    def _kill_after_grace(self, task: _Task) -> None:
        if not task.ended.wait(self.abort_grace_s) and task.process is not None:
            _signal_group(task.process, signal.SIGKILL)

    def abort_boots(self) -> None:
        with self._lock:
            self._aborting_boots = True
            booting = list(self._booting.values())
        for process in booting:
            _signal_group(process, signal.SIGKILL)

    def stop_node(self, node_id: str, kill: bool = False) -> None:
        with self._lock:
            node = self._nodes.pop(node_id, None)
            booting = self._booting.get(node_id)
            tasks = [self._tasks[task_id] for task_id in node.tasks] if node is not None else []
        if booting is not None:
            _signal_group(booting, signal.SIGKILL)
        if node is None:
            return
        for task in tasks:
            self._end(task, signal.SIGKILL if kill else signal.SIGTERM)
        for task in tasks:
            task.ended.wait(self.abort_grace_s + 5)
        if node.sshd is not None:
            ssh.stop(node.sshd)
        self.network.remove_node(node.sandbox)
        shutil.rmtree(node.tmp, ignore_errors=True)

    def task_output(self, task_id: str) -> str:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None:
            return ""
        try:
            return (task.directory / "taskoutput.txt").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def processes(self) -> list[int]:
        with self._lock:
            roots = {task.process.pid for task in self._tasks.values()
                     if task.process is not None and not task.ended.is_set()}
            roots |= {process.pid for process in self._booting.values()}
            roots |= {node.sshd.pid for node in self._nodes.values()
                      if node.sshd is not None and node.sshd.poll() is None}
        return _descendants_and_self(roots)

    def close(self) -> None:
        self.abort_boots()
        with self._lock:
            node_ids = list(self._nodes)
        stoppers = [threading.Thread(target=self.stop_node, args=(node_id,), daemon=True)
                    for node_id in node_ids]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
        self.network.close()


def _file_name(ydid: str) -> str:
    return ydid.replace(":", "_").replace("/", "_")


def _signal_group(process: subprocess.Popen[bytes], signal_number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal_number)


def _descendants_and_self(roots: set[int]) -> list[int]:
    """Live (non-zombie) processes in the trees under `roots`, read from /proc."""
    if not roots:
        return []
    children: dict[int, list[int]] = {}
    live: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        pid = int(entry.name)
        children.setdefault(int(parent), []).append(pid)
        if state != "Z":
            live.add(pid)
    found: list[int] = []
    pending = [pid for pid in roots if pid in live]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(child for child in children.get(pid, []) if child in live)
    return sorted(found)
