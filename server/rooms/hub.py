"""Local sockets per room: each event frame encoded once, coalesced per tick, written to all.

A quiet room's event goes out at once; a busy room's events of one tick go out as one
`events` frame, so the cost follows frames, not events.

A frame is written in slices of a few milliseconds of CPU each; the replies made meanwhile
(acks, errors) are written before every slice, and whatever else is ready (Redis replies, the
sockets' reads) runs between two slices, so a gifter never waits behind a big room. A room
whose pass costs more than its share of the loop lowers its frame rate to stay within it.

A big room's frame rate also follows its size: the node's socket writes per second are a
budget its sending rooms share (rooms/budget.py), so a room of N local sockets sends at most a
frame every N / (its share) seconds, known before any pass has cost anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from server import errors
from server.codes import Err, GiftstreamError
from server.errors import Disconnect
from server.metrics import ROOM_DELIVERY_LAG_SECONDS
from server.protocol import parse_offset
from server.rooms.budget import fair_shares
from server.rooms.conn import Conn, flush_replies
from server.rooms.frames import OutFrame

log = logging.getLogger("giftstream.hub")

# Sockets written between two looks at the clock within a slice.
CLOCK_EVERY = 16
# How often the write budget is shared out again over the rooms sending, and how long after
# its last frame a room still counts as sending.
SHARE_EVERY_S = 0.5
SENDING_S = 2.0
# A viewer-count snapshot (`presence`) rides free on a frame the room sends anyway: it joins the
# events waiting for that frame, or takes the place of a count still waiting there. On its own,
# in a room with nothing else to send, it is one write to every socket, so such snapshots take
# at most SNAPSHOT_SHARE of the room's write share, and come once in SNAPSHOT_FRAMES of its frame
# intervals at most. In a join storm the count changes every second: pushed to every socket each
# time, it took as many writes as the room's whole budget (50,000 sockets over four workers: a
# join cost 1.36 ms of CPU); once in five frame intervals, still a tenth of a join's CPU and a
# stall of a second whenever every worker's turn came at once (100,000 sockets over eight).
SNAPSHOT_FRAMES = 5
SNAPSHOT_SHARE = 0.05


class _Pass:
    """One frame on its way to every socket of a room."""

    __slots__ = ("busy", "ends_room", "events", "first", "frame", "last", "oldest_ms", "started")

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.frame = OutFrame({"type": "events", "events": events})
        self.first = next((e["offset"] for e in events if "offset" in e), None)
        self.last = next((e["offset"] for e in reversed(events) if "offset" in e), None)
        self.ends_room = any(e.get("type") == "room_ended" for e in events)
        # The oldest event time (ms; a gift's debit) in the frame, for its delivery lag.
        self.oldest_ms: int | None = min((e["ts"] for e in events if "ts" in e), default=None)
        self.started = time.monotonic()
        # Seconds spent writing this frame, all slices together: what the pass cost the loop.
        self.busy = 0.0


class LocalRoom:
    __slots__ = ("room_id", "conns", "users", "pending", "scheduled", "next_frame_at", "last_offset", "ended",
                 "presence_sent", "leaderboard_sent", "subscribed", "flushed_upto", "passing", "state",
                 "read_offset", "share", "last_frame", "others", "events_seen", "state_seen", "snapshot_at")

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.conns: set[Conn] = set()
        # Sockets per user in this room: a user with three tabs open is one viewer.
        self.users: dict[str, int] = {}
        self.pending: list[dict[str, Any]] = []
        self.scheduled = False
        # Earliest start of the room's next frame (monotonic): a tick after the last one began, or
        # later when the last pass cost more than the room's share of the loop.
        self.next_frame_at = 0.0
        # Offset of the newest event seen from the bus: where a catch-up after a bus outage starts.
        self.last_offset: str | None = None
        self.ended = False
        self.presence_sent: int | None = None
        self.leaderboard_sent: list[Any] | None = None
        self.subscribed: asyncio.Future[None] | None = None
        # Offset of the last event of the last frame sent to every ready socket: a socket whose
        # last offset is exactly this needs no per-socket check (the common case, cheap).
        self.flushed_upto: str | None = None
        self.passing = False
        # The room's state (rooms.state.RoomState) and its stream's offset, as a join read them
        # from Redis once this node was subscribed: later joins need no read of the offset (any
        # offset read after the subscription, or any newer one the bus brought, is a correct
        # welcome offset: every event past it reaches the room's sockets) and share one read of
        # the state a round trip (its goal moves). The room's end comes over the bus (`ended`).
        self.state: Any = None
        self.read_offset: str | None = None
        # Socket writes per second this room may make (its share of the node's budget), None
        # until the budget was last shared out; when its last frame began.
        self.share: float | None = None
        self.last_frame = 0.0
        # When the last viewer-count snapshot was queued for the room (monotonic).
        self.snapshot_at = 0.0
        # Viewers of the room on other nodes, as this node's last count write answered (the room
        # total less what it wrote): a join's welcome counts the room with no write of its own.
        self.others: int | None = None
        # Events with an offset seen from the bus, and how many there were when `state` was asked
        # for: an event since (a gift moves the goal, a goal event, the end) makes it stale.
        self.events_seen = 0
        self.state_seen = -1

    def state_fresh(self) -> bool:
        """No event came since `state` was read: it is the room as it is (up to events in flight)."""
        return self.state is not None and self.state_seen == self.events_seen

    def known_offset(self) -> str | None:
        """A welcome offset for a join with no Redis read: the newest this node knows of."""
        if self.read_offset is None:
            return None
        if self.last_offset is not None and offset_after(self.last_offset, self.read_offset):
            return self.last_offset
        return self.read_offset


def offset_after(offset: str | None, other: str | None) -> bool:
    if offset is None:
        return True
    if other is None:
        return True
    return parse_offset(offset) > parse_offset(other)


def _subscribed(room: LocalRoom) -> bool:
    done = room.subscribed
    return done is not None and done.done() and not done.cancelled() and done.exception() is None


def catch_up_from(room: LocalRoom) -> str | None:
    """Where a catch-up after a bus outage starts: the newest event the room saw from the bus or,
    before any came, the oldest point a local socket is live from (its welcome or resume)."""
    if room.last_offset is not None:
        return room.last_offset
    oldest: str | None = None
    for conn in room.conns:
        if conn.last_offset is not None and (oldest is None or offset_after(oldest, conn.last_offset)):
            oldest = conn.last_offset
    return oldest


class Hub:
    def __init__(self, tick_ms: float, pass_slice: int = 1000, slice_ms: float = 2.0,
                 fanout_share: float = 1.0, per_user_room: int = 0, per_user: int = 0,
                 writes_per_s: float = 0.0) -> None:
        self.tick = tick_ms / 1000.0
        # Socket writes per second this process's rooms may make together (0: no budget).
        self.writes_per_s = max(0.0, writes_per_s)
        self._shared_at = 0.0
        # Sockets one user may hold in one room, and in all rooms, on this node (0: no cap).
        self.per_user_room = per_user_room
        self.per_user = per_user
        # Each user's sockets on this node, joined or joining: the per-node cap counts them, and a
        # user's own messages (the `wallet` event) go to them without a scan of every socket.
        self.user_sockets: dict[str, set[Conn]] = {}
        # A step of a pass ends after this many sockets or this much time, whichever comes first;
        # then other callbacks get the loop.
        self.pass_slice = max(1, pass_slice)
        self.slice_s = max(0.0, slice_ms) / 1000.0
        # The share of the loop's time one room's fan-out may take: a room whose pass took B
        # seconds starts its next frame no sooner than B / share after the last one began.
        self.share = min(1.0, max(0.01, fanout_share))
        self.rooms: dict[str, LocalRoom] = {}
        # Set by the app: subscribe / unsubscribe the room's bus channel.
        self.on_first_join: Callable[[str], Awaitable[None]] | None = None
        self.on_last_leave: Callable[[str], Awaitable[None]] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        # Rooms a join is reading from Redis now: the joins that come meanwhile wait for it and
        # join as known rooms, rather than each reading the room again.
        self._learning: dict[str, asyncio.Future[None]] = {}
        self.frames = 0
        self.deliveries = 0
        self.events = 0

    def connections(self) -> int:
        return sum(len(r.conns) for r in self.rooms.values())

    def sockets_of(self, user_id: str) -> list[Conn]:
        """The user's sockets on this node, in any room."""
        return list(self.user_sockets.get(user_id, ()))

    def viewers(self, room_id: str) -> int:
        """Distinct users with a socket in this room on this node."""
        room = self.rooms.get(room_id)
        return len(room.users) if room is not None and not room.ended else 0

    def _admit(self, room: LocalRoom | None, conn: Conn) -> None:
        """Count the socket against its user's caps, checked and counted in one step (no await
        between them), or refuse it: `too_many_connections`, closed with 4429."""
        user = conn.principal.user_id
        in_room = room.users.get(user, 0) if room is not None else 0
        if self.per_user_room and in_room >= self.per_user_room:
            raise GiftstreamError(Err.TOO_MANY_CONNECTIONS, "too many sockets of this user in this room")
        mine = self.user_sockets.get(user)
        if self.per_user and mine is not None and len(mine) >= self.per_user:
            raise GiftstreamError(Err.TOO_MANY_CONNECTIONS, "too many sockets of this user on this node")
        self.user_sockets.setdefault(user, set()).add(conn)

    def _discount(self, room: LocalRoom | None, conn: Conn) -> None:
        user = conn.principal.user_id
        mine = self.user_sockets.get(user)
        if mine is not None:
            mine.discard(conn)
            if not mine:
                del self.user_sockets[user]
        if room is not None and conn in room.conns:
            room.conns.discard(conn)
            n = room.users.get(user, 0) - 1
            if n > 0:
                room.users[user] = n
            else:
                room.users.pop(user, None)

    def _add(self, room: LocalRoom, conn: Conn) -> None:
        room.conns.add(conn)
        user = conn.principal.user_id
        room.users[user] = room.users.get(user, 0) + 1

    async def join(self, conn: Conn) -> LocalRoom:
        room = self.rooms.get(conn.room_id)
        self._admit(room, conn)
        if room is None:
            room = self.rooms[conn.room_id] = LocalRoom(conn.room_id)
            room.subscribed = asyncio.get_running_loop().create_future()
            self._add(room, conn)
            try:
                if self.on_first_join is not None:
                    await self.on_first_join(conn.room_id)
                room.subscribed.set_result(None)
            except BaseException as exc:
                room.subscribed.set_exception(exc)
                room.subscribed.exception()  # mark retrieved
                self.rooms.pop(conn.room_id, None)
                self._discount(room, conn)
                raise
        else:
            self._add(room, conn)
            assert room.subscribed is not None
            try:
                await asyncio.shield(room.subscribed)
            except BaseException:
                self._discount(room, conn)
                raise
        return room

    def join_known(self, conn: Conn) -> LocalRoom | None:
        """Add a socket to a room this node is subscribed to and knows the state of, at once (no
        await); None when the room is not known so (`join` then does the slow way). Raises, as
        `join`, when the user is over a cap."""
        room = self.rooms.get(conn.room_id)
        if room is None or room.ended or room.state is None or room.read_offset is None or not _subscribed(room):
            return None
        self._admit(room, conn)
        self._add(room, conn)
        return room

    def learning(self, room_id: str) -> asyncio.Future[None] | None:
        """Done when the join reading this room now has remembered it (or failed); None when no
        join is reading it."""
        return self._learning.get(room_id)

    def learn(self, room_id: str) -> asyncio.Future[None]:
        fut = self._learning[room_id] = asyncio.get_running_loop().create_future()
        return fut

    def learned(self, room_id: str, fut: asyncio.Future[None]) -> None:
        if self._learning.get(room_id) is fut:
            del self._learning[room_id]
        if not fut.done():
            fut.set_result(None)

    def remember(self, room_id: str, state: Any, offset: str | None, seen: int) -> None:
        """What a join read from Redis after the subscription, for the joins after it; `seen`: the
        room's events_seen when the read was asked for."""
        room = self.rooms.get(room_id)
        if room is None or not _subscribed(room):
            return
        if state is not None:
            room.state, room.state_seen = state, seen
        if offset is not None and (room.read_offset is None or offset_after(offset, room.read_offset)):
            room.read_offset = offset

    def events_seen(self, room_id: str) -> int:
        room = self.rooms.get(room_id)
        return room.events_seen if room is not None else -1

    def counted(self, room_id: str, total: int, local: int) -> None:
        """A count write of the room answered `total` viewers, this node having written `local`."""
        room = self.rooms.get(room_id)
        if room is not None:
            room.others = max(0, total - local)

    def viewers_now(self, room: LocalRoom) -> int | None:
        """The room's viewers: this node's now, the others' as last counted (None: not yet)."""
        return None if room.others is None else room.others + len(room.users)

    async def leave(self, conn: Conn) -> None:
        room = self.rooms.get(conn.room_id)
        if room is None or conn not in room.conns:
            return
        self._discount(room, conn)
        if not room.conns and self.rooms.get(conn.room_id) is room:
            del self.rooms[conn.room_id]
            if self.on_last_leave is not None:
                try:
                    await self.on_last_leave(conn.room_id)
                except Exception:
                    log.warning("unsubscribe of room %s failed", conn.room_id, exc_info=True)

    def release(self, conn: Conn, after: str | None) -> None:
        """End a join or resume: send held events newer than `after`, then go live."""
        events = [e for e in conn.held if "offset" not in e or offset_after(e["offset"], after)]
        conn.held = []
        conn.ready = True
        if events:
            conn.send_message({"type": "events", "events": events})
            self._note_offset(conn, events)

    def deliver(self, room_id: str, event: dict[str, Any]) -> None:
        """An event for every local socket of the room (from the bus, or local presence)."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        offset = event.get("offset")
        if offset is not None:
            if not offset_after(offset, room.last_offset):
                return  # already delivered (catch-up overlap)
            room.last_offset = offset
            room.events_seen += 1
        self.events += 1
        room.pending.append(event)
        if event.get("type") == "room_ended":
            room.ended = True
            self.flush(room)
            return
        if not room.scheduled:
            room.scheduled = True
            self._schedule(room)

    def _schedule(self, room: LocalRoom) -> None:
        loop = asyncio.get_running_loop()
        # A room's end goes out as soon as the pass in progress is done, budget or not.
        wait = 0.0 if room.ended else room.next_frame_at - time.monotonic()
        if wait <= 0:
            loop.call_soon(self._due, room)  # quiet room: no delay
        else:
            loop.call_later(wait, self._due, room)

    def _due(self, room: LocalRoom) -> None:
        wait = room.next_frame_at - time.monotonic()
        if wait > 0.001 and not room.passing and not room.ended:
            # A pass that ended after this was scheduled pushed the next frame back.
            asyncio.get_running_loop().call_later(wait, self._due, room)
            return
        self.flush(room)

    def flush(self, room: LocalRoom) -> None:
        room.scheduled = False
        if room.passing or not room.pending:
            return  # a pass in progress schedules the next flush when it is done
        events, room.pending = room.pending, []
        p = _Pass(events)
        room.last_frame = p.started
        room.next_frame_at = p.started + self.frame_interval(room, p.started)
        self.frames += 1
        room.passing = True
        self._pass(room, p, list(room.conns), 0)

    def frame_interval(self, room: LocalRoom, now: float) -> float:
        """Seconds from this frame to the room's next: the tick, or longer when the room's
        sockets at that rate would take more than its share of the write budget."""
        if not self.writes_per_s:
            return self.tick
        if now >= self._shared_at + SHARE_EVERY_S:
            self._share_out(now)
        share = room.share if room.share is not None else self.writes_per_s
        return max(self.tick, len(room.conns) / share) if share > 0 else self.tick

    def snapshot(self, room: LocalRoom, event: dict[str, Any]) -> bool:
        """Send a room-wide snapshot (`presence`) if it may go now; True when it went. It rides
        on the room's next frame when one is waiting (the newest replaces one of its type still
        there), and otherwise goes on its own within the snapshots' part of the write budget."""
        now = time.monotonic()
        if room.pending:
            waiting = next((e for e in room.pending if e.get("type") == event["type"]), None)
            if waiting is not None:
                waiting.update(event)  # not encoded yet: the frame will carry the newest
            else:
                self.deliver(room.room_id, event)
            room.snapshot_at = now
            return True
        if now - room.snapshot_at < self.snapshot_gap(room, now):
            return False
        room.snapshot_at = now
        self.deliver(room.room_id, event)
        return True

    def snapshot_gap(self, room: LocalRoom, now: float) -> float:
        """Seconds between two snapshots that go out on their own: SNAPSHOT_FRAMES frame
        intervals, or longer when the room's sockets over its write share's SNAPSHOT_SHARE are."""
        gap = SNAPSHOT_FRAMES * self.frame_interval(room, now)
        if self.writes_per_s:
            share = room.share if room.share is not None else self.writes_per_s
            gap = max(gap, len(room.conns) / (SNAPSHOT_SHARE * share)) if share > 0 else gap
        return gap

    def _share_out(self, now: float) -> None:
        """The budget over the rooms sending now, max-min fair (a small room gets all it asks)."""
        self._shared_at = now
        sending = [r for r in self.rooms.values() if r.pending or now - r.last_frame < SENDING_S]
        for r in self.rooms.values():
            r.share = None
        shares = fair_shares([len(r.conns) / self.tick for r in sending], self.writes_per_s)
        for r, share in zip(sending, shares, strict=True):
            r.share = share

    def _pass(self, room: LocalRoom, p: _Pass, conns: list[Conn], start: int) -> None:
        """Write one frame to a slice of the room's sockets; the next slice runs after whatever
        else is ready (acks, Redis replies, other rooms), so a 5,000-socket pass never holds the
        loop whole. Replies already made go out first."""
        flush_replies()
        began = time.perf_counter()
        deadline = began + self.slice_s
        limit = min(len(conns), start + self.pass_slice)
        end = start
        sent = 0
        events, frame, first, last = p.events, p.frame, p.first, p.last
        while end < limit:
            upto = min(limit, end + CLOCK_EVERY)
            for conn in conns[end:upto]:
                if not conn.ready:
                    conn.held.extend(events)
                    continue
                if (first is not None and conn.last_offset is not None and conn.last_offset != room.flushed_upto
                        and not offset_after(first, conn.last_offset)):
                    # This socket already has some of these (its welcome or resume came after them,
                    # while they were still on the bus): send it only the newer ones.
                    self._send_newer(conn, events)
                    continue
                if conn.send(frame):
                    sent += 1
                    if last is not None:
                        conn.last_offset = last
            end = upto
            if time.perf_counter() >= deadline:
                break
        p.busy += time.perf_counter() - began
        self.deliveries += sent * len(events)
        loop = asyncio.get_running_loop()
        if end < len(conns):
            loop.call_soon(self._pass, room, p, conns, end)
            return
        room.passing = False
        # A pass that cost more than the room's share of the loop pushes the next frame back.
        room.next_frame_at = max(room.next_frame_at, p.started + p.busy / self.share)
        if p.oldest_ms is not None:  # once per frame pass, never per socket
            ROOM_DELIVERY_LAG_SECONDS.observe(max(0.0, time.time() - p.oldest_ms / 1000))
        if last is not None:
            room.flushed_upto = last
        if p.ends_room:
            for conn in list(room.conns):
                task = loop.create_task(conn.close(errors.ROOM_ENDED))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        elif room.pending and not room.scheduled:
            room.scheduled = True
            self._schedule(room)

    def _send_newer(self, conn: Conn, events: list[dict[str, Any]]) -> None:
        newer = [e for e in events if "offset" not in e or offset_after(e["offset"], conn.last_offset)]
        if newer and conn.send_message({"type": "events", "events": newer}):
            self.deliveries += len(newer)
            self._note_offset(conn, newer)

    def _note_offset(self, conn: Conn, events: list[dict[str, Any]]) -> None:
        for e in reversed(events):
            if "offset" in e:
                conn.last_offset = e["offset"]
                return

    async def close_all(self, disconnect: Disconnect) -> None:
        for room in list(self.rooms.values()):
            self.flush(room)
            await asyncio.gather(*(c.close(disconnect) for c in list(room.conns)), return_exceptions=True)
