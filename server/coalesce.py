"""One call per key in flight; the callers that come while it is out share the next one.

A join storm asks the same things of Redis for every socket of a room (its state, the node's
viewer count written): thousands of identical calls a second. Here each key has at most one
call out; whoever asks meanwhile waits for the next, which leaves as soon as the one out
returns, so every caller's answer was read (or written) after it asked, and under load the
calls per key follow the round trips, not the callers (as the Lua batcher commits gifts).

With `spacing_s`, a key's calls also leave at least that far apart: the next waits out the gap
after the one before left. A viewer-count write in a join storm otherwise left as fast as
Redis answered (one per fsync, thousands a second over a node's workers), a gateway's CPU
spent on writes nobody waited for: a joining socket is welcomed with the count as it is known.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Slot(Generic[T]):
    __slots__ = ("left", "next", "out")

    def __init__(self) -> None:
        # A call is out, or set to leave once the spacing allows.
        self.out = False
        self.next: asyncio.Future[T] | None = None
        self.left = float("-inf")  # when the last call left (loop time)


class Coalesced(Generic[K, T]):
    def __init__(self, call: Callable[[K], Awaitable[T]], spacing_s: float = 0.0) -> None:
        self.call = call
        self.spacing = spacing_s
        self._slots: dict[K, _Slot[T]] = {}
        self.calls = 0

    def soon(self, key: K) -> asyncio.Future[T]:
        """The result of a call for `key` made now, or as soon as the one out returns."""
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot()
        if slot.next is None:
            slot.next = asyncio.get_running_loop().create_future()
        waiting = slot.next
        if not slot.out:
            self._leave(key, slot)
        return waiting

    def _leave(self, key: K, slot: _Slot[T]) -> None:
        """The next call for `key` leaves now, or once the spacing after the last allows."""
        loop = asyncio.get_running_loop()
        wait = slot.left + self.spacing - loop.time()
        slot.out = True  # callers meanwhile share the call set to leave
        if wait > 0:
            loop.call_later(wait, self._send, key, slot)
        else:
            self._send(key, slot)

    def _send(self, key: K, slot: _Slot[T]) -> None:
        waiting, slot.next = slot.next, None
        assert waiting is not None
        slot.left = asyncio.get_running_loop().time()
        self.calls += 1
        try:
            call: asyncio.Future[T] = asyncio.ensure_future(self.call(key))
        except Exception as exc:  # the call failed before it was made
            call = asyncio.get_running_loop().create_future()
            call.set_exception(exc)
        call.add_done_callback(partial(self._returned, key, slot, waiting))

    def _returned(self, key: K, slot: _Slot[T], waiting: asyncio.Future[T], call: asyncio.Future[Any]) -> None:
        slot.out = False
        if not waiting.done():
            if call.cancelled():
                waiting.cancel()
            elif (exc := call.exception()) is not None:
                waiting.set_exception(exc)
                waiting.exception()  # retrieved: a caller that stopped waiting is not an error
            else:
                waiting.set_result(call.result())
        if slot.next is not None:
            self._leave(key, slot)
            return
        # Idle: the slot is kept as long as it remembers a spacing to keep.
        loop = asyncio.get_running_loop()
        wait = slot.left + self.spacing - loop.time()
        if wait > 0:
            loop.call_later(wait, self._forget, key, slot)
        else:
            self._forget(key, slot)

    def _forget(self, key: K, slot: _Slot[T]) -> None:
        if not slot.out and slot.next is None and self._slots.get(key) is slot:
            del self._slots[key]
