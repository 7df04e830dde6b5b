"""How the local platform's API reads requests: query parameters, flags, and JSON bodies
(gzip or not) checked to be an object or an array."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

from fastapi import Request

from prefect_raydog.local.state import InvalidRequest


def params(request: Request) -> dict[str, list[str]]:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        params.setdefault(key, []).append(value)
    return params


def flag(value: str | None) -> bool:
    return (value or "").lower() == "true"


async def json_body(request: Request) -> Any:
    raw = await request.body()
    if request.headers.get("content-encoding", "").lower() == "gzip":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise InvalidRequest("Request body is not valid gzip") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        raise InvalidRequest(f"Request body is not valid JSON: {error}") from None


async def object_body(request: Request, what: str) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise InvalidRequest(f"Request body must be a {what} object")
    return body


async def json_list(request: Request, what: str) -> list[Any]:
    body = await json_body(request)
    if body is None:
        return []
    if not isinstance(body, list):
        raise InvalidRequest(f"Request body must be a JSON array of {what} objects")
    return body
