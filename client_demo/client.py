"""An asyncio client for a Giftstream room: connect with a token, read the feed, send gifts.

    async with RoomClient("http://127.0.0.1:8000", "demo", token) as room:
        ack = await room.gift("rose", count=5)          # GiftRefused on a final refusal
        async for item in room.feed():                  # room events, each stored one once
            ...

What it does for you (docs/protocol.md says why each matters):
- gifts carry an id that stays the same on every retry: after a reply `unavailable` or
  `rate_limited`, and after a reconnect, the gift is sent again with that id, so it is charged
  at most once; any other error is final (`GiftRefused`); a gift still unanswered 30 minutes
  after it was sent is not sent again (`GiftUnanswered`: the server forgets an id after an hour);
- a dropped socket is reconnected with jittered backoff, or after the close's advised
  `retry_ms`; a close that advises against reconnecting ends the client (`RoomClosed`);
- after a reconnect it resumes from the last offset it handed on (with the room's epoch) and
  hands on each stored event once, whatever the replay repeats;
- it gives up after `max_tries` connection attempts in a row and says which URL it could not
  reach (`CannotConnect`).

Besides room events, `feed()` yields the client's own notices, maps with a `type` that the
server never sends: `connected` (the welcome, on every connection), `disconnected` (`code`,
`reason`, `wait_s` before the next try) and `resume_failed` (the server's snapshot).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from client_demo._wire import JSON, MSGPACK, decode, encode, socket_url
from client_demo.state import GIFT_MAX_AGE_S, Backoff, CloseAdvice, Feed, PendingGifts

# Connection failures the client retries (refused, timed out, a handshake answered with an
# HTTP error, as a wrong path is); anything else is a bug to show.
CONNECT_ERRORS: Final = (OSError, TimeoutError, InvalidHandshake)
# How long to wait before a gift refused with `unavailable`/`rate_limited` goes again.
GIFT_RETRY_S: Final = 0.5
_END: Final = object()


class ClientError(Exception):
    """Base of the client's errors."""


class CannotConnect(ClientError):
    def __init__(self, url: str, tries: int, cause: str) -> None:
        super().__init__(f"cannot connect to {url} after {tries} tries ({cause}); is the server running "
                         "there? check --url")
        self.url, self.tries, self.cause = url, tries, cause


class RoomClosed(ClientError):
    """The server closed the socket and advised not to reconnect (4401, 4404, 4410, ...)."""

    def __init__(self, advice: CloseAdvice) -> None:
        super().__init__(f"closed {advice.describe()}")
        self.advice = advice


class GiftRefused(ClientError):
    """A final refusal: the gift was not charged (`code` is a reply error code)."""

    def __init__(self, gift_id: str, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.gift_id, self.code, self.message = gift_id, code, message


class GiftUnanswered(ClientError):
    """No answer came within GIFT_MAX_AGE_S of the first send: the gift may or may not have been
    charged (the balance and GET /v1/wallet/transactions show it if it was), and it is not sent
    again, as the server may have forgotten its id by the next try."""

    def __init__(self, gift_id: str) -> None:
        super().__init__(f"gift {gift_id} unanswered for {GIFT_MAX_AGE_S // 60} minutes; not sent again")
        self.gift_id = gift_id


class RoomClient:
    def __init__(self, url: str, room: str, token: str, *, subprotocol: str = MSGPACK, max_tries: int = 8,
                 backoff_first_s: float = 0.5, backoff_cap_s: float = 5.0, open_timeout_s: float = 10.0) -> None:
        if subprotocol not in (MSGPACK, JSON):
            raise ValueError(f"subprotocol is {MSGPACK} or {JSON}")
        self.url, self.room = url, room
        self.subprotocol = subprotocol
        self.max_tries = max_tries
        self.open_timeout_s = open_timeout_s
        self._socket_url = socket_url(url, room, token)
        # The socket URL with its token left out, for messages and logs.
        self.where = socket_url(url, room, "...")
        self.backoff = Backoff(backoff_first_s, backoff_cap_s)
        self.position = Feed()
        self.pending = PendingGifts()
        self.welcome: dict[str, Any] = {}
        # Why the client stopped for good (None while it runs).
        self.error: ClientError | None = None
        self._ws: Any = None
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self._connected = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # A demo and test hook: True loses this reply (ack or error) as a cut network would: the
        # socket is dropped before the reply is read, and the gift goes again on the next socket.
        self.lose_reply: Callable[[dict[str, Any]], bool] | None = None

    async def __aenter__(self) -> RoomClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect (retrying as configured); CannotConnect or RoomClosed if that fails."""
        self._runner = asyncio.get_running_loop().create_task(self._run())
        ready = asyncio.get_running_loop().create_task(self._connected.wait())
        await asyncio.wait([ready, self._runner], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self.error is not None:
            await self.close()
            raise self.error

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._stop(self.error or ClientError("client closed"))

    # --- sending gifts ---------------------------------------------------------------------

    async def gift(self, gift: str, count: int = 1, gift_id: str | None = None,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """Send a gift and wait for its `ack`. Retried with the same id until it is answered for
        good; GiftRefused on a final refusal, the client's error if it stops first."""
        gid = gift_id or f"cli-{uuid.uuid4().hex[:12]}"
        if self.error is not None:
            raise self.error
        waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[gid] = waiter
        frame = self.pending.add(gid, gift, count)
        self._send(frame)  # not connected right now: the reconnect sends it
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        finally:
            if waiter.done() or timeout_s is not None:
                self._waiters.pop(gid, None)

    def _send(self, frame: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return
        task = asyncio.get_running_loop().create_task(self._send_now(ws, frame))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_now(self, ws: Any, frame: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionClosed):  # the reconnect sends what is still pending
            await ws.send(encode(frame, self.subprotocol))

    async def _retry_later(self, gid: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self._expire()
        frame = self.pending.frames.get(gid)
        if frame is not None:
            self._send(frame)

    def _expire(self) -> None:
        """Gifts too old to send again end unanswered (GiftUnanswered)."""
        for gid in self.pending.expire():
            waiter = self._waiters.pop(gid, None)
            if waiter is not None and not waiter.done():
                waiter.set_exception(GiftUnanswered(gid))

    def drop(self) -> None:
        """Cut the current socket without a close frame, as a flaky network does (demos, tests):
        the client reconnects, resumes and resends what is unanswered."""
        if self._ws is not None:
            self._ws.transport.abort()

    # --- reading the feed ------------------------------------------------------------------

    async def feed(self) -> AsyncIterator[dict[str, Any]]:
        """Room events (each stored one once) and the client's notices, until the client stops;
        then the reason it stopped is raised (RoomClosed, CannotConnect)."""
        while True:
            item = await self._items.get()
            if item is _END:
                self._items.put_nowait(_END)  # for any other reader
                if self.error is not None and not isinstance(self.error, RoomClosed | CannotConnect):
                    return
                assert self.error is not None
                raise self.error
            yield item

    # --- the connection loop ---------------------------------------------------------------

    async def _run(self) -> None:
        cause = ""
        while True:
            advice: CloseAdvice | None = None
            try:
                async with websockets.connect(
                        self._socket_url, subprotocols=[self.subprotocol],  # type: ignore[list-item]
                        open_timeout=self.open_timeout_s, max_size=1 << 24) as ws:
                    await self._session(ws)
                advice = CloseAdvice.parse(1000, "")
            except ConnectionClosed as exc:
                rcvd = exc.rcvd
                advice = CloseAdvice.parse(rcvd.code if rcvd else None, rcvd.reason if rcvd else None)
            except InvalidURI as exc:
                self._stop(CannotConnect(self.where, self.backoff.failures + 1, f"invalid URL: {exc}"))
                return
            except (ClientError, ValueError) as exc:  # not a Giftstream room socket
                self._stop(ClientError(f"{self.where}: {exc}"))
                return
            except CONNECT_ERRORS as exc:
                cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            finally:
                self._ws = None
            if advice is not None and not advice.reconnect:
                self._stop(RoomClosed(advice))
                return
            if self.backoff.failures + 1 >= self.max_tries:
                last = advice.describe() if advice is not None else cause
                self._stop(CannotConnect(self.where, self.max_tries, last))
                return
            wait = self.backoff.next(advice.retry_ms if advice else None)
            if advice is not None:
                self._items.put_nowait({"type": "disconnected", "code": advice.code, "reason": advice.reason,
                                        "retry_ms": advice.retry_ms, "wait_s": wait})
                cause = advice.describe()
            else:
                self._items.put_nowait({"type": "unreachable", "url": self.where, "error": cause,
                                        "tries": self.backoff.failures, "wait_s": wait})
            await asyncio.sleep(wait)

    async def _session(self, ws: Any) -> None:
        welcome = decode(await ws.recv())
        if welcome.get("type") != "welcome":
            raise ClientError(f"expected welcome, got {welcome.get('type')!r}")
        self.backoff.reset()
        self.welcome = welcome
        self._ws = ws
        self._items.put_nowait({**welcome, "type": "connected", "resumed": self.position.offset is not None,
                                "since": self.position.offset})
        resume = self.position.resume_frame(welcome)
        if resume is not None:
            await ws.send(encode(resume, self.subprotocol))
        self._expire()
        unanswered = self.pending.unanswered()
        if unanswered:  # same ids: a gift charged before the drop is not charged again
            self._items.put_nowait({"type": "resent", "ids": [f["id"] for f in unanswered]})
        for frame in unanswered:
            await ws.send(encode(frame, self.subprotocol))
        self._connected.set()
        while True:
            self._handle(decode(await ws.recv()))

    def _handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "events":
            for event in msg.get("events", []):
                if self.position.accept(event):
                    self._items.put_nowait(event)
        elif kind in ("ack", "error"):
            if self.lose_reply is not None and self._ws is not None and self.lose_reply(msg):
                self._ws.transport.abort()
                return
            answer = self.pending.answer(msg)
            if answer is None:
                if kind == "error":
                    self._items.put_nowait(msg)  # a reply to no gift of ours (a bad resume): show it
                return
            if answer.outcome == "retry":
                task = asyncio.get_running_loop().create_task(self._retry_later(answer.id, GIFT_RETRY_S))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            waiter = self._waiters.pop(answer.id, None)
            if waiter is not None and not waiter.done():
                if answer.outcome == "acked":
                    waiter.set_result(msg)
                else:
                    waiter.set_exception(GiftRefused(answer.id, str(msg.get("code")), str(msg.get("message"))))
        elif kind == "resume_failed":
            self.position.restart(msg)
            self._items.put_nowait(msg)
        elif kind != "pong":
            self._items.put_nowait(msg)

    def _stop(self, error: ClientError) -> None:
        if self.error is None:
            self.error = error
        for gid, waiter in list(self._waiters.items()):
            if not waiter.done():
                waiter.set_exception(self.error)
            self._waiters.pop(gid, None)
        self._items.put_nowait(_END)
