"""This process's sessions by configuration: shared by a flow and its subflows, and parked
across a failed flow-run attempt that Prefect will retry."""

from __future__ import annotations

import atexit
import threading
from typing import Any

from prefect.exceptions import TerminationSignal

from prefect_raydog.runner.session import Session
from prefect_raydog.runner.settings import SessionSettings

# Sessions entered in this process, by configuration: subflows share their parent's cluster.
_SESSIONS: dict[tuple, Session] = {}
_SESSIONS_LOCK = threading.Lock()


# Sessions kept across a failed flow-run attempt that Prefect will retry, by configuration.
PARKED: dict[tuple, tuple[Session, threading.Timer]] = {}
PARK_MARGIN_S = 60.0


def _retry_coming(flow_run: Any) -> bool:
    """Whether the engine is about to retry this flow run (its state was set back to running)."""
    state = getattr(flow_run, "state", None)
    return state is not None and not state.is_final()


def _park(session: Session, flow_run: Any) -> None:
    """Keep the cluster for the retry; end it if no retry enters in time."""
    policy = getattr(flow_run, "empirical_policy", None)
    delay = getattr(policy, "retry_delay", None) or 0
    timer = threading.Timer(float(delay) + PARK_MARGIN_S, _end_parked, (session.key,))
    timer.daemon = True
    with _SESSIONS_LOCK:
        PARKED[session.key] = (session, timer)
    timer.start()


def _unpark(key: tuple) -> Session | None:
    parked = PARKED.pop(key, None)
    if parked is None:
        return None
    parked[1].cancel()
    return parked[0]


def _end_parked(key: tuple) -> None:
    with _SESSIONS_LOCK:
        session = _unpark(key)
    if session is not None:
        session.close()


@atexit.register
def _end_all_parked() -> None:
    for key in list(PARKED):
        _end_parked(key)


def take_session(settings: SessionSettings) -> Session:
    """The session for a runner's `settings`: the live one, a parked one, or a new one.

    A process has one Ray connection: while a session of another configuration holds it or is
    connecting (a subflow with its own runner inside a flow with another), the runner shares
    that session, as prefect-ray shares the connection, and its own configuration is not used."""
    key = settings.key
    with _SESSIONS_LOCK:
        session = (
            _SESSIONS.get(key)
            or _unpark(key)
            or next((live for live in _SESSIONS.values() if live.holds_connection()), None)
            or Session(settings)
        )
        _SESSIONS[key] = session
        session.users += 1
    return session


def release_session(session: Session, flow_run: Any, exc_type: type | None) -> None:
    """Let go of `session`; its last user parks it for a coming retry or closes it."""
    with _SESSIONS_LOCK:
        session.users -= 1
        last_user = session.users == 0
        if last_user:
            for key in [key for key, live in _SESSIONS.items() if live is session]:
                del _SESSIONS[key]
    if last_user and exc_type is None and _retry_coming(flow_run):
        _park(session, flow_run)
    elif last_user:
        if exc_type is None or issubclass(exc_type, Exception):
            session.settle()
        elif issubclass(exc_type, TerminationSignal):
            session.runs.terminated()
        session.close()


def live_session(key: tuple) -> Session | None:
    with _SESSIONS_LOCK:
        return _SESSIONS.get(key)
