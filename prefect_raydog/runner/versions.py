"""What a node must share with the driver, its versions (Python minor, Ray, Prefect,
prefect-raydog) and a Prefect API it reaches, read and compared with the standard library alone:
the driver ships this module to the nodes by value, so it runs on a node whose image lacks
prefect-raydog or Prefect."""

from __future__ import annotations

import importlib.metadata
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable

PACKAGES = ("ray", "prefect", "prefect-raydog")
"""What every node runs a task run with: Ray's worker, Prefect's task engine, `runner/node.py`."""
HOW_TO_MATCH = (
    "Give the nodes the driver's versions: `prefect-raydog node-requirements` prints them, and "
    "with --userdata node userdata that installs them (see \"The Ray cluster's nodes do not run "
    "this driver's versions\" in docs/troubleshooting.md)."
)


class NodeEnvironmentError(RuntimeError):
    """A node cannot run the driver's task runs (its Python, Ray, Prefect or prefect-raydog is
    not the driver's, or it cannot reach the Prefect API); no task was sent."""


class NodeAPIUnreachableError(NodeEnvironmentError):
    """A node cannot reach the Prefect API URL it was given; no task was sent."""


API_PROBE_TIMEOUT_S = 5.0
"""A node's GET of the Prefect API's health endpoint: an API it reaches answers in milliseconds."""
HOW_TO_REACH_THE_API = (
    "Give the nodes a Prefect API URL that they reach with RayDogTaskRunner(node_api_url=...), "
    "or, for a Prefect API served on this machine's loopback, set api_relay_address (on the "
    "runner or the cluster block) to an address of this machine that the nodes reach (see \"The "
    "cluster's nodes cannot reach the Prefect API\" in docs/troubleshooting.md)."
)


def installed() -> dict[str, str | None]:
    """This process's Python minor version and executable, and the version of each of
    `PACKAGES` (None when it is not installed)."""
    found: dict[str, str | None] = {
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "executable": sys.executable,
    }
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def probe(api_url: str | None, timeout_s: float) -> dict[str, str | None]:
    """`installed()`, and under "api" why this node cannot reach `api_url` (None: it can, or
    there is no URL to try)."""
    found = installed()
    found["api"] = unreachable(api_url, timeout_s) if api_url else None
    return found


def unreachable(api_url: str, timeout_s: float) -> str | None:
    """Why a GET of the Prefect API's health endpoint at `api_url` gets no answer, or None when
    it gets one: any HTTP status, or a TLS certificate that this bare check does not trust
    (Prefect's own settings may), shows that a server answers there."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as exc:
        return None if isinstance(exc.reason, ssl.SSLError) else str(exc.reason)
    except ssl.SSLError:
        return None
    except (OSError, ValueError) as exc:  # a timeout while reading; a URL urllib cannot open
        return str(exc) or type(exc).__name__


def mismatches(driver: dict[str, str | None], node: dict[str, str | None],
               where: str) -> list[str]:
    """One line per version of `node` (a node or nodes, `where`) that is not the driver's."""
    lines = []
    for name in ("python", *PACKAGES):
        wanted, found = driver.get(name), node.get(name)
        if found == wanted:
            continue
        if found is None:
            lines.append(
                f"the node's Python at {node.get('executable')} ({where}) has no {name}: install "
                f"it with `pip install {name}=={wanted}`"
            )
        else:
            label = "Python" if name == "python" else name
            lines.append(f"{label}: the driver has {wanted}, {where} has {found}")
    return lines


CHECKED_ON_CONNECT = (
    "The Ray cluster's nodes do not run this driver's versions, so no task was sent to them"
)
CHECKED_ON_NODE = (
    "A node that joined the Ray cluster after the driver checked it does not run the driver's "
    "versions, so it runs no task run"
)


def error(lines: Iterable[str], lead: str = CHECKED_ON_CONNECT) -> NodeEnvironmentError:
    """The one error that names every mismatch."""
    return NodeEnvironmentError(f"{lead}: {'; '.join(lines)}. {HOW_TO_MATCH}")


_OWN: dict[str, str | None] = {}


def own() -> dict[str, str | None]:
    """`installed()`, read once per process."""
    if not _OWN:
        _OWN.update(installed())
    return _OWN


def check_this_node(driver: dict[str, str | None] | None, where: str) -> None:
    """Raise `NodeEnvironmentError` if this node's versions are not `driver`'s: a node that
    joined after the driver checked the cluster."""
    if driver and (lines := mismatches(driver, own(), where)):
        raise error(lines, CHECKED_ON_NODE)


def check_this_nodes_api(api_url: str | None, checked: bool, where: str) -> None:
    """Raise `NodeAPIUnreachableError` if this node, which the driver did not find reaching
    `api_url` (`checked` false: it joined later), gets no answer there."""
    if api_url and not checked and (why := unreachable(api_url, API_PROBE_TIMEOUT_S)):
        raise NodeAPIUnreachableError(
            f"A node that joined the Ray cluster after the driver checked it cannot reach the "
            f"Prefect API at {api_url} ({where}: {why}), so it runs no task run. "
            f"{HOW_TO_REACH_THE_API}"
        )
