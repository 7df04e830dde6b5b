"""`RayDogNodeProvider`: Ray's NodeProvider interface translated to YellowDog, for `ray up` on the
user's machine and for Ray's autoscaler (the monitor) on the head node. The YellowDog calls live
in `yellowdog.py`, the tag store in `tags.py`, the YAML keys in `config.py`."""

from __future__ import annotations

import copy
import json
import logging
import secrets
import subprocess
import threading
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from ray.autoscaler.node_provider import NodeProvider
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    STATUS_UP_TO_DATE,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from prefect_raydog.autoscaler import config as yaml_keys
from prefect_raydog.autoscaler.remote import CheckedSSHCommandRunner, RemoteShell, host_key_options
from prefect_raydog.autoscaler.tags import TAGS_DIR, FileTags, RemoteTags, TagStore
from prefect_raydog.autoscaler.yellowdog import (
    ClusterRecord,
    HeadNodeFailed,
    LiveNode,
    NodeType,
    YellowDogCluster,
)
from prefect_raydog.cluster.token_auth import SSHLogin, TokenAuth, write_token_command
from prefect_raydog.spec import check_name

logger = logging.getLogger("prefect_raydog.autoscaler")

DEFAULT_HEAD_SCRIPT = "head"
DEFAULT_WORKER_SCRIPT = "worker"
HEAD_ENVIRONMENT = {"RAY_AUTOSCALING_CONFIG": "ray_bootstrap_config.yaml",
                    "AUTOSCALER_UPDATE_INTERVAL_S": "2"}
"""The head script's environment under `ray up`: Ray's autoscaler with the config `ray up`
uploads to the head's home, looking at demand every 2 s (Ray's default: 5) so that a pending task
waits less for its node, for one YellowDog task search per update."""
LOCKED = {"RAYDOG_TOKEN_FILE": yaml_keys.TOKEN_FILE}
"""Every node's task waits for the cluster's Ray token in this file and starts Ray with it."""
LOCKED_SHELLS = ("grep -qsx 'export RAY_AUTH_MODE=token' ~/.bashrc || "
                 "echo 'export RAY_AUTH_MODE=token' >> ~/.bashrc")
"""The shells of `ray exec`, `ray submit` and `ray attach` on the head source ~/.bashrc: there
Ray's CLI (`ray status`) and drivers then present the token from its default file."""
ROLE_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class RayDogNodeProvider(NodeProvider):
    """Ray nodes as YellowDog tasks: one work requirement per cluster, a task group and a
    provisioned worker pool per node type, node id = task id.

    Example:
        ```yaml
        provider:
          type: external
          module: prefect_raydog.autoscaler.RayDogNodeProvider
          cluster_namespace: ray
        ```
    """

    def __init__(self, provider_config: dict[str, Any], cluster_name: str) -> None:
        super().__init__(provider_config, cluster_name)
        self.settings = yaml_keys.parse(yaml_keys.ProviderConfig, provider_config, "provider")
        self.cluster_name = check_name(cluster_name.lower())
        self._home = Path.home()
        self._on_head = (self._home / yaml_keys.CLUSTER_FILE).is_file()
        # Ray's monitor calls a provider from several threads (node updaters, the autoscaler):
        # every read and write of the node and tag caches below holds this lock.
        self._lock = threading.RLock()
        self._cluster: YellowDogCluster | None = None
        self._store: TagStore | None = None
        self._tags: dict[str, dict[str, str]] = {}
        self._nodes: dict[str, LiveNode] = {}
        self._head_task_id: str | None = None
        self._token_auth: TokenAuth | None = None

    # ---- the cluster and its tag store, found lazily -----------------------------------------

    def _yellowdog(self) -> YellowDogCluster:
        with self._lock:
            if self._cluster is None:
                from prefect_raydog.cluster import create_client

                key = yaml_keys.credentials(self.settings, self._home)
                self._cluster = YellowDogCluster(
                    create_client(key.key_id, key.key_secret, key.url), self.cluster_name,
                    self.settings.cluster_namespace, self.settings.cluster_tag or None,
                    self.settings.lifetime, self.settings.idle_node_shutdown)
                if self._on_head:
                    self._cluster.record = ClusterRecord.from_json(
                        (self._home / yaml_keys.CLUSTER_FILE).read_text())
                    self._store = FileTags(self._home / TAGS_DIR)
                    self._cluster.watch_updates()
                    self._follow_workers()
                elif self._cluster.find() is not None:
                    self._attach()
            return self._cluster

    def _follow_workers(self) -> None:
        """On the head: write the head's Ray token on each worker node as it comes up, over
        SSH with the key `ray up` copied to the head, checking host keys as `ray up` does."""
        token = self._home / yaml_keys.TOKEN_FILE
        auth = self.provider_config.get("auth") or {}
        key = Path(auth.get("ssh_private_key", yaml_keys.HEAD_KEY_FILE)).expanduser()
        try:
            login = SSHLogin(auth.get("ssh_user", "yd-agent"), SecretStr(key.read_text()),
                             host_keys=self.settings.host_keys())
            self._token_auth = TokenAuth(login, SecretStr(token.read_text().strip()),
                                         yaml_keys.TOKEN_FILE)
        except (OSError, ValueError) as error:
            logger.error("Worker nodes of cluster %s will not get its Ray token, and so not "
                         "join: %s", self.cluster_name, error)
            return
        cluster = self._cluster
        self._token_auth.follow(lambda: {node.task_id: node.private_ip
                                         for node in cluster.live_nodes()
                                         if not node.is_head and node.private_ip})

    def _attach(self) -> None:
        """From the user's machine, reach the running cluster's tag store on its head node."""
        head = next((n for n in self._cluster.live_nodes() if n.is_head and n.public_ip), None)
        if head is None:
            return
        self._cluster.record.head_private_ip = head.private_ip or ""
        if "auth" not in self.provider_config:
            # Ray's `get-head-ip` and `get-worker-ips` give no login (they skip
            # bootstrap_config), and need no more than YellowDog knows: a head that runs.
            self._tags = {head.task_id: {TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE}}
            return
        self._store = RemoteTags(self._shell(head))
        self._tags = self._store.load()

    def _shell(self, head: LiveNode) -> RemoteShell:
        auth = self.provider_config.get("auth") or {}
        return RemoteShell(head.public_ip, auth.get("ssh_user", "yd-agent"),
                           Path(auth.get("ssh_private_key", "~/.ssh/id_rsa")).expanduser(),
                           self._host_key_options(head.task_id))

    def _host_key_options(self, node_id: str) -> dict[str, str]:
        """OpenSSH options checking a node's host key with the YAML's `ssh_known_hosts`."""
        return host_key_options(self.settings.host_keys(), self.cluster_name, node_id)

    def get_command_runner(self, log_prefix: str, node_id: str, auth_config: dict[str, Any],
                           cluster_name: str, process_runner: Any, use_internal_ip: bool,
                           docker_config: dict[str, Any] | None = None) -> Any:
        """Ray's SSH command runner (`ray up`, `ray exec`, `ray attach`), checking host keys
        as this provider's own SSH does, where Ray's options check none."""
        return CheckedSSHCommandRunner(
            self._host_key_options(node_id), log_prefix=log_prefix, node_id=node_id,
            provider=self, auth_config=auth_config, cluster_name=cluster_name,
            process_runner=process_runner, use_internal_ip=use_internal_ip)

    def _refresh(self) -> list[LiveNode]:
        nodes = self._yellowdog().live_nodes()
        with self._lock:
            self._nodes = {node.task_id: node for node in nodes}
            if self._on_head:
                self._tags = self._store.load()
        return nodes

    def _node(self, node_id: str) -> LiveNode | None:
        with self._lock:
            if node_id in self._nodes:
                return self._nodes[node_id]
        self._refresh()
        with self._lock:
            return self._nodes.get(node_id)

    # ---- NodeProvider ------------------------------------------------------------------------

    def non_terminated_nodes(self, tag_filters: dict[str, str]) -> list[str]:
        nodes = self._refresh()
        with self._lock:
            head_ended = self._head_task_id and not any(
                n.task_id == self._head_task_id for n in nodes)
        if head_ended:
            self._head_ended()
        return [node.task_id for node in nodes
                if all(self.node_tags(node.task_id).get(k) == v for k, v in tag_filters.items())]

    def _head_ended(self) -> None:
        """The head this `ray up` started has ended: end the cluster and say why."""
        with self._lock:
            head_task_id, self._head_task_id = self._head_task_id, None
        failure = self._cluster.head_failure(head_task_id)
        self._cluster.shut_down()
        if failure is not None:
            raise failure

    def is_running(self, node_id: str) -> bool:
        node = self._node(node_id)
        return node is not None and node.private_ip is not None

    def is_terminated(self, node_id: str) -> bool:
        return self._node(node_id) is None

    def node_tags(self, node_id: str) -> dict[str, str]:
        with self._lock:
            node, tags = self._nodes.get(node_id), self._tags.get(node_id, {})
        derived = {} if node is None else {
            TAG_RAY_NODE_KIND: NODE_KIND_HEAD if node.is_head else NODE_KIND_WORKER,
            TAG_RAY_USER_NODE_TYPE: node.node_type}
        return {**derived, **tags}

    def external_ip(self, node_id: str) -> str | None:
        node = self._node(node_id)
        return None if node is None else node.public_ip or node.private_ip

    def internal_ip(self, node_id: str) -> str | None:
        node = self._node(node_id)
        return None if node is None else node.private_ip

    def set_node_tags(self, node_id: str, tags: dict[str, str]) -> None:
        with self._lock:
            merged = {**self._tags.get(node_id, {}), **tags}
            self._tags[node_id] = merged
            if self._store is not None:
                self._store.save(node_id, merged)

    def create_node(self, node_config: dict[str, Any], tags: dict[str, str], count: int
                    ) -> dict[str, Any] | None:
        return self.create_node_with_resources_and_labels(node_config, tags, count, {}, {})

    def create_node_with_resources_and_labels(
        self, node_config: dict[str, Any], tags: dict[str, str], count: int,
        resources: dict[str, float], labels: dict[str, str],
    ) -> dict[str, Any] | None:
        type_name = tags.get(TAG_RAY_USER_NODE_TYPE, tags[TAG_RAY_NODE_KIND])
        where = f"available_node_types.{type_name}.node_config"
        settings = yaml_keys.parse(yaml_keys.NodeConfig, node_config, where)
        if tags[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD:
            self._create_head(settings, type_name, tags)
            return None
        node_type = self._node_type(settings, type_name, is_head=False)
        environment = {**self.settings.task_environment, **_worker_environment(
            self._yellowdog().record.head_private_ip, resources), **LOCKED}
        for task_id in self._yellowdog().add_workers(node_type, count, environment):
            self.set_node_tags(task_id, tags)
        logger.info("Added %d %s node(s) to cluster %s", count, type_name, self.cluster_name)
        return None

    def terminate_node(self, node_id: str) -> dict[str, Any] | None:
        return self.terminate_nodes([node_id])

    def terminate_nodes(self, node_ids: list[str]) -> dict[str, Any] | None:
        cluster = self._yellowdog()
        if any(self.node_tags(n).get(TAG_RAY_NODE_KIND) == NODE_KIND_HEAD for n in node_ids):
            report = cluster.shut_down()
            logger.info("Shut down cluster %s: %s", self.cluster_name, report)
            with self._lock:
                self._nodes, self._tags, self._store = {}, {}, None
                self._head_task_id = None
            return None
        for node_id in node_ids:
            cluster.end_node(node_id)
            with self._lock:
                self._tags.pop(node_id, None)
                self._nodes.pop(node_id, None)
                if self._store is not None:
                    self._store.forget(node_id)
        return None

    def cleanup_cluster_resources(self) -> None:
        """After `ray down` ended every node: end any pool of the cluster still live."""
        if self._cluster is not None and self._cluster.record is not None:
            self._cluster.shut_down()

    # ---- the head node -----------------------------------------------------------------------

    def _create_head(self, settings: yaml_keys.NodeConfig, type_name: str,
                     tags: dict[str, str]) -> None:
        """Start the cluster: head pool, work requirement, head task; once the head runs, give
        it the application key, the cluster's identity and a Ray token of its own over SSH,
        then its tags."""
        cluster = self._yellowdog()
        node_type = self._node_type(settings, type_name, is_head=True)
        workers = [name for name, info in self._node_types().items() if not info["is_head"]]
        task_id = cluster.create(node_type, workers,
                                 {**HEAD_ENVIRONMENT, **self.settings.task_environment, **LOCKED})

        def check_head() -> None:
            failure = cluster.head_failure(task_id)
            if failure is not None:
                raise failure

        try:
            head = cluster.wait_for_head(task_id, self.settings.build_timeout)
            shell = self._shell(head)
            shell.wait_until_reachable(self.settings.build_timeout.total_seconds(), check_head)
            key = yaml_keys.credentials(self.settings, self._home)
            key.url = self.settings.head_api_url or key.url
            shell.run(f"umask 077 && mkdir -p ~/{yaml_keys.RAYDOG_DIR} && "
                      f"cat > ~/{yaml_keys.CREDENTIALS_FILE}", stdin=key.to_json())
            shell.run(f"cat > ~/{yaml_keys.CLUSTER_FILE}", stdin=cluster.record.to_json())
            shell.run(f"{write_token_command(yaml_keys.TOKEN_FILE)} && {LOCKED_SHELLS}",
                      stdin=secrets.token_hex(32))
            with self._lock:
                self._store = RemoteTags(shell)
                self._head_task_id = task_id
            self.set_node_tags(task_id, tags)
        except BaseException as error:
            failure = None if isinstance(error, HeadNodeFailed) else cluster.head_failure(task_id)
            cluster.shut_down()
            if failure is not None:
                raise failure from error
            raise
        logger.info("Head node of cluster %s runs at %s", self.cluster_name, head.public_ip)

    def _node_types(self) -> dict[str, dict[str, Any]]:
        return self.provider_config.get("node_types") or {}

    def _node_type(self, settings: yaml_keys.NodeConfig, type_name: str, is_head: bool
                   ) -> NodeType:
        script = (self.settings.ray_head_node_task_script if is_head
                  else self.settings.ray_worker_node_task_script)
        if script is None:
            from prefect_raydog.scripts import load

            script = load(DEFAULT_HEAD_SCRIPT if is_head else DEFAULT_WORKER_SCRIPT)
        userdata = _with_authorized_key(settings.full_userdata,
                                        self.provider_config.get("auth") or {})
        max_nodes = 1 if is_head else int(
            self._node_types().get(type_name, {}).get("max_workers") or 1)
        return NodeType(type_name, settings.compute_requirement_template, script,
                        max(max_nodes, 1), settings.images_id, userdata, settings.metrics_enabled)

    # ---- before anything is provisioned ------------------------------------------------------

    def prepare_for_head_node(self, cluster_config: dict[str, Any]) -> dict[str, Any]:
        """The head's copy of the config: its provider logs in to the workers with the key
        `ray up` copies to the head, where the YAML's own path means nothing."""
        config = copy.deepcopy(cluster_config)
        config["provider"]["auth"] = dict(config.get("auth") or {})
        return config

    @staticmethod
    def bootstrap_config(cluster_config: dict[str, Any]) -> dict[str, Any]:
        """Validate the YAML's provider and node configs (naming the bad key), read `file:`
        values, and record what the head's monitor needs: the auth, the node types, and that
        Ray's own node updaters are off (the task scripts start Ray, not SSH)."""
        config = copy.deepcopy(cluster_config)
        provider = config["provider"]
        yaml_keys.read_file_values(
            provider, ("ray_head_node_task_script", "ray_worker_node_task_script",
                       "ssh_known_hosts"), "provider")
        settings = yaml_keys.parse(yaml_keys.ProviderConfig, provider, "provider")
        settings.host_keys()
        check_name(config["cluster_name"].lower())
        head_type = config.get("head_node_type")
        node_types = {}
        for name, node_type in (config.get("available_node_types") or {}).items():
            where = f"available_node_types.{name}.node_config"
            try:
                check_name(name)
            except ValueError as error:
                raise yaml_keys.AutoscalerConfigError(
                    f"Invalid cluster YAML: available_node_types.{name}: {error}") from None
            node_config = node_type.setdefault("node_config", {})
            yaml_keys.read_file_values(node_config, ("userdata", "extra_userdata"), where)
            yaml_keys.parse(yaml_keys.NodeConfig, node_config, where)
            node_types[name] = {"is_head": name == head_type,
                                "max_workers": node_type.get("max_workers",
                                                             config.get("max_workers", 1))}
        provider["auth"] = dict(config.get("auth") or {})
        provider["node_types"] = node_types
        provider["disable_node_updaters"] = True
        for path in settings.files_to_upload:
            local = (yaml_keys.config_dir() / path).resolve()
            config.setdefault("file_mounts", {})[f"~/{local.name}"] = str(local)
        return config


def _worker_environment(head_ip: str, resources: dict[str, float]) -> dict[str, str]:
    custom = {k: v for k, v in (resources or {}).items() if k not in ROLE_RESOURCES}
    environment = {"RAY_HEAD_IP": head_ip, "RAY_HEAD_NODE_PRIVATE_IP": head_ip,
                   "RAY_NUM_CPUS": str(int((resources or {}).get("CPU", 1)))}
    if custom:
        environment["RAY_RESOURCES"] = json.dumps(custom)
    return environment


def _with_authorized_key(userdata: str | None, auth: dict[str, Any]) -> str | None:
    """Userdata that also authorizes `ray up`'s key for the agent user (a public key, no
    secret): on the head for `ray up`, on the workers for the head's token delivery; on the
    local platform, the key line is what opens SSH into the node."""
    key_file = auth.get("ssh_public_key") or (
        f"{auth['ssh_private_key']}.pub" if auth.get("ssh_private_key") else None)
    if key_file is None:
        return userdata
    path = Path(key_file).expanduser()
    if path.is_file():
        public_key = path.read_text().strip()
    else:
        private = Path(auth["ssh_private_key"]).expanduser()
        public_key = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], check=True,
                                    capture_output=True, text=True).stdout.strip()
    user = auth.get("ssh_user", "yd-agent")
    snippet = (f"mkdir -p ~{user}/.ssh && cat >> ~{user}/.ssh/authorized_keys <<'EOF'\n"
               f"{public_key}\nEOF\n")
    return f"{userdata.rstrip()}\n{snippet}" if userdata else f"#!/bin/bash\n{snippet}"
