"""Final task-run states, held compactly by the driver until something reads them.

A flow run's driver keeps a future per task run and each future its final state. As Prefect
objects a state takes about 6 KB, so a flow that maps 10,000 tasks would hold 60 MB of them.
Nodes send each state pickled; the driver keeps a small one zlib-compressed against the first
state it kept (the states of one flow's tasks differ in ids, times and values, so each packs
to about 130 bytes held) and unpickles it each time it is read.
"""

from __future__ import annotations

import pickle
import threading
import zlib
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from prefect.states import State

# Compressing a large result would cost time and save little beside the value itself.
_LARGEST_PACKED = 64 * 1024

Kept = Union[bytes, "State"]

_dictionary: bytes | None = None
_dictionary_lock = threading.Lock()


def _dictionary_for(pickled: bytes) -> bytes:
    """The process's compression dictionary: the first state packed. It never changes, because
    every packed state needs the dictionary it was packed with."""
    global _dictionary
    with _dictionary_lock:
        if _dictionary is None:
            _dictionary = pickled
        return _dictionary


def keep(pickled: bytes) -> Kept:
    """A pickled final state as the driver keeps it: packed if small, else unpickled."""
    if len(pickled) > _LARGEST_PACKED:
        return pickle.loads(pickled)
    compressor = zlib.compressobj(zdict=_dictionary_for(pickled))
    return compressor.compress(pickled) + compressor.flush()


def unpack(kept: Kept) -> State:
    """The state itself, a new object on each call."""
    if not isinstance(kept, bytes):
        return kept
    decompressor = zlib.decompressobj(zdict=_dictionary)  # type: ignore[arg-type]
    return pickle.loads(decompressor.decompress(kept) + decompressor.flush())
