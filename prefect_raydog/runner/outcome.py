"""`Outcome`: what a remote task run sends back. Its own module, free of Prefect, because the
head's Ray Client server unpickles it on its way to the driver (see `runner/remote.py`)."""

from __future__ import annotations

import pickle
from typing import Any, NamedTuple


class Outcome(NamedTuple):
    """What a remote task run sends back: the node it ran on and its final Prefect state,
    pickled there so that the driver can keep it packed (`runner.packing`)."""

    node_ip: str
    state_pickle: bytes

    @property
    def state(self) -> Any:
        return pickle.loads(self.state_pickle)
