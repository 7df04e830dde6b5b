"""Requests answered in a millisecond or two, not after a delayed ACK (about 40 ms): every
listener the project makes must send small replies at once (TCP_NODELAY)."""

from __future__ import annotations

import uuid

from round_trips import QUARTILE_BOUND_MS, lower_quartile_ms, split_reply_ms, split_reply_server
from yellowdog_client.model import WorkRequirement

from prefect_raydog.forwarding import TcpForwarder
from prefect_raydog.local import LocalPlatform


def test_a_platform_request_is_answered_without_waiting_for_a_delayed_ack(
    platform: LocalPlatform,
) -> None:
    work = platform.client.work_client
    requirement = work.add_work_requirement(
        WorkRequirement(namespace="latency", name=f"latency-{uuid.uuid4().hex[:8]}")
    )
    try:
        quick = lower_quartile_ms(lambda: work.get_work_requirement_by_id(requirement.id))
    finally:
        work.cancel_work_requirement_by_id(requirement.id)
    assert quick < QUARTILE_BOUND_MS, f"the fastest quarter of requests took {quick:.1f} ms"


def test_the_api_relay_forwards_a_split_reply_without_waiting_for_a_delayed_ack() -> None:
    with split_reply_server() as address, TcpForwarder("127.0.0.1", address) as relay:
        quick = split_reply_ms(relay.port)
    assert quick < QUARTILE_BOUND_MS, f"the fastest quarter relayed took {quick:.1f} ms"
