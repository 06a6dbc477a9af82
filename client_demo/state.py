"""The client's bookkeeping, without I/O: close advice, backoff, the feed's resume point and
duplicate guard, and the gifts waiting for an answer.

The asyncio client (`client.py`) and the locust users (`loadtests/locustfile.py`, gevent)
drive the same objects, so both follow docs/protocol.md the same way: a gift keeps its id on
every retry, `retry_ms` is waited as advised, a resume starts from the last offset handled and
each stored event is handed on once.
"""

from __future__ import annotations

import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from client_demo._wire import STOP_CODES, offset_key

# Reply codes after which the same gift (same id) is sent again; every other error is final.
RETRYABLE: Final = frozenset({"rate_limited", "unavailable"})
# A gift unanswered this long after it was first sent is not sent again. The server remembers a
# charged id for an hour (docs/protocol.md, "Idempotency"); a resend after that would be charged
# as a new gift. Half of it leaves room for a clock step and a slow server; wall-clock time, so
# the hours a laptop or a phone slept count too.
GIFT_MAX_AGE_S: Final = 30 * 60


@dataclass(frozen=True, slots=True)
class CloseAdvice:
    """A close frame read as the server's advice (docs/protocol.md, "Close codes")."""

    code: int
    reason: str
    # False: reconnecting as things are cannot help (bad token, room ended, a client bug).
    reconnect: bool
    # The server's delay before reconnecting, already jittered per socket; None: our own backoff.
    retry_ms: int | None = None

    @classmethod
    def parse(cls, code: int | None, reason: str | None) -> CloseAdvice:
        """Giftstream's closes carry JSON `{"reason","reconnect","retry_ms"}`; a close from the
        WebSocket layer or a proxy may be plain text, and no close frame at all reads as 1006."""
        if code is None:
            return cls(1006, "connection lost", True)
        text = reason or ""
        try:
            advice = json.loads(text)
        except ValueError:
            advice = None
        if not isinstance(advice, dict):
            return cls(code, text or STOP_CODES.get(code, ""), code not in STOP_CODES)
        retry = advice.get("retry_ms")
        reconnect = advice.get("reconnect")
        return cls(code, str(advice.get("reason", "")),
                   bool(reconnect) if isinstance(reconnect, bool) else code not in STOP_CODES,
                   retry if isinstance(retry, int) and not isinstance(retry, bool) and retry >= 0 else None)

    def describe(self) -> str:
        return f"{self.code} {self.reason}".strip()


class Backoff:
    """Delays that double after each failure in a row, from `first` to `cap` seconds, each
    spread over +-20% so clients that dropped together do not come back together. A delay the
    server advised is taken as it is: it is already jittered."""

    def __init__(self, first: float = 0.5, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self._next = first
        # Failures in a row since the last success.
        self.failures = 0

    def next(self, advised_ms: int | None = None) -> float:
        self.failures += 1
        base, self._next = self._next, min(self.cap, self._next * 2)
        if advised_ms is not None:
            return advised_ms / 1000
        return base * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next, self.failures = self.first, 0


class Feed:
    """Where a room's feed stands: the resume point (offset, epoch) and a guard that hands each
    stored event on once, across reconnects and resumes."""

    def __init__(self, remember: int = 4096) -> None:
        # Every stored event up to here has been handed on: the next resume's `since`.
        self.offset: str | None = None
        self.epoch: str | None = None
        # The newest offset handed on (live events can run ahead of a resume's replay).
        self._high: str | None = None
        # A resumed socket's welcome offset: the replay is whole once that event arrives.
        self._gap_end: str | None = None
        self._seen: deque[str] = deque()
        self._seen_set: set[str] = set()
        self._remember = remember

    def resume_frame(self, welcome: dict[str, Any]) -> dict[str, Any] | None:
        """After a welcome: the `resume` to send (None on a first join, which starts here)."""
        if self.offset is None:
            self.offset = self._high = str(welcome.get("offset"))
            self.epoch = welcome.get("epoch")
            return None
        behind = offset_key(str(welcome.get("offset"))) > offset_key(self.offset)
        self._gap_end = str(welcome["offset"]) if behind else None
        frame: dict[str, Any] = {"type": "resume", "since": self.offset}
        if self.epoch is not None:
            frame["epoch"] = self.epoch
        return frame

    def accept(self, event: dict[str, Any]) -> bool:
        """True if `event` is to be handed on: a snapshot (no offset) or a stored event not seen yet."""
        offset = event.get("offset")
        if offset is None:
            return True
        offset = str(offset)
        fresh = offset not in self._seen_set
        if fresh:
            self._seen_set.add(offset)
            self._seen.append(offset)
            if len(self._seen) > self._remember:
                self._seen_set.discard(self._seen.popleft())
        if self._high is None or offset_key(offset) > offset_key(self._high):
            self._high = offset
        if self._gap_end is None or offset == self._gap_end:
            self._gap_end = None
            self.offset = self._high
        return fresh

    def restart(self, msg: dict[str, Any]) -> None:
        """`resume_failed`: the gap is lost; carry on from the snapshot's offset (and epoch)."""
        self.offset = self._high = str(msg.get("offset"))
        self.epoch = msg.get("epoch") or self.epoch
        self._gap_end = None


@dataclass(frozen=True, slots=True)
class Answer:
    """What a reply means for the gift it answers."""

    id: str
    # "acked", "retry" (same id, later) or "refused" (final).
    outcome: str
    message: dict[str, Any]


class PendingGifts:
    """Gifts sent and not answered for good. Each keeps its frame, so every retry (after a
    reconnect, or after `unavailable`/`rate_limited`) sends the same id: the server charges an
    id at most once."""

    def __init__(self, max_tries: int = 8, max_age_s: float = GIFT_MAX_AGE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.frames: dict[str, dict[str, Any]] = {}
        self.tries: dict[str, int] = {}
        # When each gift was first sent (clock seconds).
        self.sent_at: dict[str, float] = {}
        # Retryable refusals a gift may get before it is given up as refused.
        self.max_tries = max_tries
        self.max_age_s = max_age_s
        self.clock = clock

    def add(self, gift_id: str, gift: str, count: int) -> dict[str, Any]:
        frame = {"type": "gift", "id": gift_id, "gift": gift, "count": count}
        self.frames[gift_id] = frame
        self.tries[gift_id] = 0
        self.sent_at[gift_id] = self.clock()
        return frame

    def expire(self) -> list[str]:
        """Forget the gifts first sent more than `max_age_s` ago, and name them: whether they were
        charged is unknown, and sending them again could charge them twice."""
        now = self.clock()
        old = [gid for gid, at in self.sent_at.items() if now - at > self.max_age_s]
        for gid in old:
            self.forget(gid)
        return old

    def answer(self, msg: dict[str, Any]) -> Answer | None:
        """Read an `ack` or `error`; None when it answers no gift of ours."""
        gid = msg.get("id")
        if msg.get("type") not in ("ack", "error") or not isinstance(gid, str) or gid not in self.frames:
            return None
        if msg["type"] == "ack":
            self.forget(gid)
            return Answer(gid, "acked", msg)
        self.tries[gid] += 1
        if msg.get("code") in RETRYABLE and self.tries[gid] < self.max_tries:
            return Answer(gid, "retry", msg)
        self.forget(gid)
        return Answer(gid, "refused", msg)

    def forget(self, gift_id: str) -> None:
        self.frames.pop(gift_id, None)
        self.tries.pop(gift_id, None)
        self.sent_at.pop(gift_id, None)

    def unanswered(self) -> list[dict[str, Any]]:
        """The frames to send again on a new socket, oldest first."""
        return list(self.frames.values())
