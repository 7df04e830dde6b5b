"""What the driver ships to the nodes with a task: the flow's own code and a reachable API URL."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prefect.utilities.importtools import lazy_import

if TYPE_CHECKING:
    import ray
    from prefect.tasks import Task

ray = lazy_import("ray")

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


def register_code_by_value(task: Task, engine_ctx: Any) -> None:
    """Ship the flow's own modules by value, so nodes run code they do not have installed."""
    import ray.cloudpickle as cloudpickle

    functions = [getattr(task, "fn", None)]
    flow = getattr(engine_ctx, "flow", None)
    if flow is not None:
        functions.append(flow.fn)
    for fn in functions:
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        path = getattr(module, "__file__", None) or ""
        if module is None or module.__name__ == "__main__" or "site-packages" in path:
            continue
        if not path or module.__name__.startswith(("prefect", "ray")):
            continue
        cloudpickle.register_pickle_by_value(module)


def rewrite_api_url(context: dict[str, Any], node_api_url: str | None) -> str | None:
    """Give nodes an API URL they reach; refuse a loopback URL that they cannot. The URL the
    nodes get."""
    settings = context.get("settings_context", {}).get("settings", {})
    api = settings.setdefault("api", {})
    url = api.get("url")
    if node_api_url:
        api["url"] = node_api_url
    elif url and _nodes_are_remote():
        refuse_loopback_api(url)
    return api.get("url")


def on_loopback(url: str) -> bool:
    """Whether `url`'s host is this machine's loopback."""
    return urlsplit(url).hostname in _LOOPBACK_HOSTS


def api_url_for_nodes(node_api_url: str | None) -> str | None:
    """The Prefect API URL the nodes get (see `rewrite_api_url`), or None for a loopback URL of
    this process's, which they are not sent (the first submission refuses it)."""
    from prefect.settings import PREFECT_API_URL

    url = node_api_url or PREFECT_API_URL.value()
    return None if url is None or (not node_api_url and on_loopback(url)) else url


def refuse_loopback_api(url: str | None) -> None:
    """Raise if `url` (None: Prefect's temporary server) is on loopback, out of the nodes' reach."""
    if url is not None and not on_loopback(url):
        return
    if url is not None and urlsplit(url).scheme == "https":
        advice = ("An https API is not relayed (the relay's address would fail the nodes' TLS "
                  "host name checks): serve it on an address the nodes reach, or pass "
                  "RayDogTaskRunner(node_api_url=...).")
    else:
        advice = ("Serve the API on an address the nodes reach, turn on the cluster block's "
                  "ssh_tunnel (the nodes then reach it through the SSH connection), or pass "
                  "RayDogTaskRunner(node_api_url=...) or RayDogTaskRunner(api_relay_address=...).")
    raise RuntimeError(
        f"The Prefect API URL {url or '(a temporary local server)'} is on loopback, which "
        f"the cluster's nodes cannot reach. {advice}"
    )


def _nodes_are_remote() -> bool:
    return ray.util.client.ray.is_connected()
