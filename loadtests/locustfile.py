"""Locust users for Giftstream: viewers that watch, gifters that recharge and send bursts, hosts
that open and end rooms. Gift ack latency and delivery latency show up as request stats:

    GIFTSTREAM_SECRET=... locust -f loadtests/locustfile.py --headless -u 1000 -r 200 -t 60s \\
        --host http://127.0.0.1:8000

Request types in the stats table:
  WS   gift ack         first send of an id -> its ack (failures: reply errors, timeouts)
  WS   delivery         a gift event's arrival at a viewer, measured from its sender's ack when the
                        sender is a user of this same locust process (keyed by gift_id), else from
                        the event's `ts` (the server's clock at ack; same machine only)
  WS   join             connect -> welcome
  POST /v1/recharges, /v1/rooms, /v1/rooms/[id]/end   plain HTTP

The wire format and the gifts' retry rules are the client library's (client_demo/_wire.py and
client_demo/state.py): a gift keeps its id on every retry, `unavailable`/`rate_limited` are
retried, anything else is final.

Env: GIFTSTREAM_SECRET (token signing secret of the server under test, required),
LOCUST_BASE_ROOMS (rooms opened at test start, default 5), LOCUST_GIFT_BURST (default 5).
The base rooms' hosts never join them: for a run longer than 5 minutes, start the server with
GIFTSTREAM_ROOM_IDLE_END_S=86400, or its rooms end for idleness (room_idle_end_s).
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import time
from collections import OrderedDict
from typing import Any

import gevent
import websocket
from locust import HttpUser, between, events, task

from client_demo._wire import MSGPACK, decode, encode, socket_url
from client_demo.client import GIFT_RETRY_S
from client_demo.state import PendingGifts
from server import auth

SECRET = os.environ.get("GIFTSTREAM_SECRET", "")
BASE_ROOMS = int(os.environ.get("LOCUST_BASE_ROOMS", "5"))
BURST = int(os.environ.get("LOCUST_GIFT_BURST", "5"))
ACK_TIMEOUT_S = 10.0
RUN = secrets.token_hex(3)
_ids = itertools.count()

# Live rooms known to this process; hosts add and remove theirs.
ROOMS: list[str] = []
# gift_id -> ack time of gifts sent from this process, for delivery latency (bounded).
ACKED_AT: OrderedDict[str, float] = OrderedDict()
ACKED_MAX = 200_000


def token(user_id: str, role: str = "viewer") -> str:
    if not SECRET:
        raise RuntimeError("set GIFTSTREAM_SECRET to the server's token signing secret")
    return auth.issue(SECRET, user_id, role=role, name=user_id)


def fire(name: str, started: float | None = None, ms: float | None = None, length: int = 0,
         exc: Exception | None = None) -> None:
    if ms is None:
        ms = (time.time() - (started or time.time())) * 1000
    events.request.fire(  # type: ignore[no-untyped-call]
        request_type="WS", name=name, response_time=ms, response_length=length, exception=exc, context={})


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def open_base_rooms(environment: Any, **_: Any) -> None:
    import httpx

    host = environment.host or "http://127.0.0.1:8000"
    for i in range(BASE_ROOMS):
        r = httpx.post(f"{host}/v1/rooms", json={"title": f"locust {RUN} #{i}"},
                       headers={"authorization": f"Bearer {token(f'lh{RUN}x{i}', 'host')}"}, timeout=30)
        r.raise_for_status()
        ROOMS.append(r.json()["room_id"])


class RoomSocket:
    """One WebSocket in a room, read by its own greenlet."""

    def __init__(self, host: str, room: str, tok: str, on_message: Any) -> None:
        self.room = room
        self.on_message = on_message
        started = time.time()
        self.ws = websocket.create_connection(socket_url(host, room, tok), subprotocols=[MSGPACK], timeout=30)
        welcome = decode(self.ws.recv())
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"expected welcome, got {welcome.get('type')}")
        fire("join", started)
        self.closed = False
        self.reader = gevent.spawn(self._read)

    def _read(self) -> None:
        try:
            while True:
                raw = self.ws.recv()
                if not raw:
                    break
                self.on_message(decode(raw), time.time())
        except Exception:
            pass
        self.closed = True

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(encode(message, MSGPACK), opcode=websocket.ABNF.OPCODE_BINARY)

    def close(self) -> None:
        self.closed = True
        try:
            self.ws.close()
        except Exception:
            pass
        self.reader.kill(block=False)


def on_events(msg: dict[str, Any], now: float) -> None:
    for e in msg.get("events", ()):
        if e.get("type") != "gift":
            continue
        acked = ACKED_AT.get(e.get("gift_id", ""))
        start = acked if acked is not None else e.get("ts", now * 1000) / 1000
        fire("delivery", ms=max(0.0, (now - start) * 1000))


class Viewer(HttpUser):
    weight = 8
    wait_time = between(5, 15)

    def on_start(self) -> None:
        self.uid = f"lv{RUN}x{next(_ids)}"
        self.sock: RoomSocket | None = None
        self.join()

    def join(self) -> None:
        if not ROOMS:
            return
        try:
            self.sock = RoomSocket(self.host or "", random.choice(ROOMS), token(self.uid), self.on_message)
        except Exception as exc:
            fire("join", ms=0, exc=exc)
            self.sock = None

    def on_message(self, msg: dict[str, Any], now: float) -> None:
        if msg.get("type") == "events":
            on_events(msg, now)

    @task
    def watch(self) -> None:
        if self.sock is None or self.sock.closed:  # room ended or dropped: go to another room
            self.join()

    def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Gifter(HttpUser):
    weight = 2
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.uid = f"lg{RUN}x{next(_ids)}"
        self.tok = token(self.uid)
        self.sock: RoomSocket | None = None
        # Unanswered gifts (same id on every retry) and when each was first sent.
        self.gifts = PendingGifts()
        self.sent_at: dict[str, float] = {}
        self.client.post("/v1/recharges", json={"coins": 100_000, "payment_method": "sandbox_card",
                                                "idempotency_key": "locust"},
                         headers={"authorization": f"Bearer {self.tok}"})
        self.join()

    def join(self) -> None:
        if not ROOMS:
            return
        try:
            self.sock = RoomSocket(self.host or "", random.choice(ROOMS), self.tok, self.on_message)
        except Exception as exc:
            fire("join", ms=0, exc=exc)
            self.sock = None
            return
        for frame in self.gifts.unanswered():  # unacked ids of a lost socket: same id, same gift
            self.sock.send(frame)

    def on_message(self, msg: dict[str, Any], now: float) -> None:
        if msg.get("type") == "events":
            on_events(msg, now)
            return
        answer = self.gifts.answer(msg)
        if answer is None:
            return
        if answer.outcome == "retry":
            gevent.spawn_later(GIFT_RETRY_S, self._retry, answer.id)
            return
        sent = self.sent_at.pop(answer.id, now)
        if answer.outcome == "acked":
            ACKED_AT[msg["gift_id"]] = now
            if len(ACKED_AT) > ACKED_MAX:
                ACKED_AT.popitem(last=False)
            fire("gift ack", ms=(now - sent) * 1000)
        else:
            fire("gift ack", ms=(now - sent) * 1000, exc=RuntimeError(str(msg.get("code"))))

    def _retry(self, cid: str) -> None:
        frame = self.gifts.frames.get(cid)
        if frame is not None and self.sock is not None and not self.sock.closed:
            self.sock.send(frame)

    @task
    def burst(self) -> None:
        if self.sock is None or self.sock.closed:
            self.join()
            if self.sock is None:
                return
        now = time.time()
        for _ in range(BURST):
            cid = f"{self.uid}-{next(_ids)}"
            self.sent_at[cid] = now
            self.sock.send(self.gifts.add(cid, "rose", 1))
        for cid, sent in list(self.sent_at.items()):
            if now - sent > ACK_TIMEOUT_S:
                self.sent_at.pop(cid, None)
                self.gifts.forget(cid)
                fire("gift ack", ms=(now - sent) * 1000, exc=TimeoutError("no ack"))

    def on_stop(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Host(HttpUser):
    weight = 1
    wait_time = between(20, 40)

    def on_start(self) -> None:
        self.uid = f"lh{RUN}x{next(_ids)}"
        self.headers = {"authorization": f"Bearer {token(self.uid, 'host')}"}
        self.room: str | None = None
        self.open()

    def open(self) -> None:
        r = self.client.post("/v1/rooms", json={"title": f"{self.uid}'s LIVE"}, headers=self.headers)
        if r.status_code == 201:
            self.room = r.json()["room_id"]
            ROOMS.append(self.room)

    @task
    def end_and_reopen(self) -> None:
        if self.room is not None:
            if self.room in ROOMS:
                ROOMS.remove(self.room)
            self.client.post(f"/v1/rooms/{self.room}/end", headers=self.headers, name="/v1/rooms/[id]/end")
        self.open()

    def on_stop(self) -> None:
        if self.room is not None:
            if self.room in ROOMS:
                ROOMS.remove(self.room)
            self.client.post(f"/v1/rooms/{self.room}/end", headers=self.headers, name="/v1/rooms/[id]/end")
