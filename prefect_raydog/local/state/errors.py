"""The errors the local platform answers in YellowDog's shape, and the checks of request
fields that raise them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect_raydog.local.wire import parse_duration


class PlatformError(Exception):
    """An error answered in YellowDog's shape: HTTP status, `errorType` and message."""

    status_code = 400
    error_type: str | None = "InvalidRequestException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(PlatformError):
    pass


class NotFound(PlatformError):
    status_code = 404
    error_type = None


class InvalidTransition(PlatformError):
    status_code = 403

    def __init__(self, entity: str, current: str, requested: str) -> None:
        super().__init__(f"Invalid transition from {current} to {requested}")
        self.error_type = f"Invalid{entity}StatusException"


def require_text(document: dict[str, Any], key: str, what: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{what}: field '{key}' is required and must be a non-empty string")
    return value


def duration(value: Any, what: str) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise InvalidRequest(f"{what}: '{value}' is not an ISO-8601 duration") from None


def auto_shutdown(value: Any, what: str) -> timedelta | None:
    """The timeout of an enabled AutoShutdown, or None when it is off."""
    if not isinstance(value, dict) or not value.get("enabled"):
        return None
    return duration(value.get("timeout", "PT0S"), what) or timedelta(0)
