"""How the local platform writes and reads YellowDog's JSON: ids, millisecond UTC datetimes
with `Z`, ISO-8601 durations, `None` left out, and error bodies."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import TypeAdapter

_DURATION = TypeAdapter(timedelta)

TYPE_PREFIX = "co.yellowdog.platform.model."
ACCOUNT = "000000"


def new_uuid() -> str:
    """The uuid part of a new `ydid:<kind>:<account>:<uuid>` id."""
    return str(uuid.uuid4())


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def iso_duration(duration: timedelta) -> str:
    """Java's `Duration.toString()` form, e.g. `PT3M`, `PT1.5S`, `PT0S`."""
    micros = round(duration.total_seconds() * 1_000_000)
    if micros == 0:
        return "PT0S"
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    hours, rest = divmod(micros, 3_600_000_000)
    minutes, rest = divmod(rest, 60_000_000)
    seconds = rest / 1_000_000
    text = "PT"
    text += f"{sign}{hours}H" if hours else ""
    text += f"{sign}{minutes}M" if minutes else ""
    if rest:
        text += f"{sign}{seconds:g}S" if rest % 1_000_000 else f"{sign}{int(seconds)}S"
    return text


def parse_duration(text: str) -> timedelta:
    return _DURATION.validate_python(text)


def compact(document: dict[str, Any]) -> dict[str, Any]:
    """The document without its `None` values (the SDK leaves them out too)."""
    return {key: value for key, value in document.items() if value is not None}


def error_body(error_type: str | None, message: str) -> dict[str, str]:
    """YellowDog's error shape, `errorType` first because clients only see 500 characters."""
    if error_type is None:
        return {"message": message}
    return {"errorType": error_type, "message": message}
