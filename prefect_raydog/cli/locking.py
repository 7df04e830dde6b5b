"""The Ray token of a cluster that `up` leaves running: the SSH login that delivers it, the file
beside the state file that keeps it for the user (and that `down` deletes), and the lines that
say how to connect with it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect_raydog.cli.output import console, fail

if TYPE_CHECKING:
    from prefect_raydog.cluster import RayDogCluster, SSHLogin
    from prefect_raydog.spec import ClusterSpec

TOKEN_SUFFIX = ".ray-token"


def token_file(state_file: Path) -> Path:
    """Where `up` keeps the Ray token of the cluster saved in `state_file`."""
    return state_file.with_name(state_file.name + TOKEN_SUFFIX)


def login_from_options(key: Path | None, user: str, known_hosts: Path | None) -> SSHLogin | None:
    """The SSH login that `--ssh-key` asks for, its key and host keys read and parsed before
    anything is provisioned; None without `--ssh-key`."""
    from pydantic import SecretStr

    from prefect_raydog.cluster import SSHLogin
    from prefect_raydog.host_keys import HostKeys

    if key is None:
        if known_hosts is not None:
            raise fail("--ssh-known-hosts: needs --ssh-key (the login that locks the cluster)", 2)
        return None
    try:
        host_keys = (HostKeys.user_known_hosts() if known_hosts is None else
                     HostKeys(_read(known_hosts, "--ssh-known-hosts"), source=str(known_hosts)))
    except ValueError as error:
        raise fail(f"--ssh-known-hosts: {error}", 2) from None
    login = SSHLogin(user, SecretStr(_read(key, "--ssh-key")), host_keys=host_keys)
    try:
        login.key()
    except ValueError as error:
        reason = str(error).removeprefix("ssh_private_key: ")
        raise fail(f"--ssh-key: {key}: {reason}", 2) from None
    return login


def _read(path: Path, option: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not text"
        raise fail(f"{option}: cannot read {path}: {reason}", 2) from None


def all_workers(spec: ClusterSpec) -> int:
    """The worker nodes a build starts: a locked `up` waits for each, to give it the token."""
    return sum(pool.start_count for pool in spec.worker_pools)


def hand_over(cluster: RayDogCluster, path: Path) -> None:
    """Save the built cluster's token to `path` and write it on every worker node the build
    started, then end the SSH connection: nothing delivers tokens once `up` exits. A worker
    that cannot get it ends the cluster and the command."""
    token_auth = cluster.token_auth
    token_auth.save(path)
    try:
        missing = token_auth.wait_for_workers(all_workers(cluster.spec),
                                              cluster.spec.build_timeout.total_seconds())
    finally:
        token_auth.close()
    if missing is not None:
        cluster.shut_down()
        path.unlink(missing_ok=True)
        raise fail(f"Writing the Ray token to the worker nodes failed ({missing}); "
                   f"cluster {cluster.spec.name!r} was shut down")


def print_connection(path: Path, ray_client: str) -> None:
    """How to reach the locked cluster: Ray reads the token file named in the environment."""
    where = path.resolve()
    console.print(f"  Ray token:       {where} (only you can read it; `down` deletes it)",
                  highlight=False, soft_wrap=True)
    console.print(f"  Connect with:    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={where} and "
                  f"ray.init(\"{ray_client}\")", highlight=False, soft_wrap=True)
