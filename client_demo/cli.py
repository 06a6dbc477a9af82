"""Terminal client for Giftstream: watch a room, send gifts, recharge, host a room.

    python -m client_demo.cli watch --url http://127.0.0.1:8000 --token TOKEN --room demo
    python -m client_demo.cli gift  --url http://127.0.0.1:8000 --token TOKEN --room demo --gift rose --count 5

`--url` and `--token` default to $GIFTSTREAM_URL and $GIFTSTREAM_TOKEN. The wire protocol
is described in docs/protocol.md; this client follows it, including resume and resends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import uuid
from typing import Any

import httpx
import websockets
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from client_demo._wire import (
    JSON,
    MSGPACK,
    STOP_CODES,
    SeenOffsets,
    decode,
    describe_event,
    describe_resume_failed,
    describe_welcome,
    encode,
    offset_key,
    socket_url,
)

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 5.0
# A gift run gives up after this many connection attempts in a row without a welcome.
GIFT_MAX_ATTEMPTS = 8
# Errors a gift may be retried after (same id); every other error is final.
RETRYABLE = {"rate_limited", "unavailable"}
CONNECT_ERRORS = (OSError, TimeoutError, InvalidHandshake)


def say(line: str) -> None:
    print(line, flush=True)


def close_info(exc: ConnectionClosed) -> tuple[int, str, int | None]:
    """(code, reason, advised retry ms) of the server's close. Its reason is JSON advice,
    {"reason", "reconnect", "retry_ms"}; a close from elsewhere (the WebSocket layer, a proxy)
    may be plain text. No close frame (a crash, a cut cable) reads as 1006, abnormal closure."""
    if exc.rcvd is None:
        return 1006, "connection lost", None
    code, reason = exc.rcvd.code, exc.rcvd.reason
    try:
        advice = json.loads(reason)
    except ValueError:
        return code, reason, None
    if not isinstance(advice, dict):
        return code, reason, None
    retry = advice.get("retry_ms")
    return code, str(advice.get("reason", "")), retry if isinstance(retry, int) else None


class Backoff:
    def __init__(self) -> None:
        self.delay = BACKOFF_MIN_S
        self.attempts = 0

    def reset(self) -> None:
        self.delay, self.attempts = BACKOFF_MIN_S, 0

    async def wait(self, advised_ms: int | None = None) -> None:
        """The next backoff delay, or the server's advised one (already jittered) when it gave one."""
        self.attempts += 1
        if advised_ms is not None:
            await asyncio.sleep(min(BACKOFF_MAX_S, advised_ms / 1000))
        else:
            await asyncio.sleep(self.delay * random.uniform(0.8, 1.2))
        self.delay = min(BACKOFF_MAX_S, self.delay * 2)


async def connect(args: argparse.Namespace) -> Any:
    return await websockets.connect(
        socket_url(args.url, args.room, args.token), subprotocols=[JSON if args.json else MSGPACK],  # type: ignore[list-item]
        open_timeout=10, max_size=1 << 24)


async def read_welcome(ws: Any) -> dict[str, Any]:
    welcome = decode(await ws.recv())
    if welcome.get("type") != "welcome":
        raise RuntimeError(f"expected welcome, got {welcome.get('type')!r}")
    return welcome


class Watcher:
    """Prints a room's events; after a drop it reconnects and resumes from its last offset."""

    def __init__(self, args: argparse.Namespace, gift_names: dict[str, str]) -> None:
        self.args = args
        self.gift_names = gift_names
        # Resume point: every stream event up to here has been printed.
        self.offset: str | None = None
        self.epoch: str | None = None
        # Newest stream offset printed (live events may run ahead of a resume replay).
        self.high: str | None = None
        # The welcome offset of a resumed connection: the replay is complete once it arrives.
        self.gap_end: str | None = None
        self.seen = SeenOffsets()
        self.backoff = Backoff()

    async def run(self) -> int:
        while True:
            advised = None
            try:
                async with await connect(self.args) as ws:
                    await self.session(ws)
            except ConnectionClosed as exc:
                code, reason, advised = close_info(exc)
                if code in STOP_CODES:
                    say(f"closed {code}: {reason or STOP_CODES[code]}")
                    return 0 if code == 4410 else 1
                delay = advised / 1000 if advised is not None else self.backoff.delay
                say(f"disconnected ({code} {reason}); reconnecting in {delay:.1f}s")
            except CONNECT_ERRORS as exc:
                say(f"cannot connect ({type(exc).__name__}); retrying in {self.backoff.delay:.1f}s")
            await self.backoff.wait(advised)

    async def session(self, ws: Any) -> None:
        welcome = await read_welcome(ws)
        self.backoff.reset()
        say(describe_welcome(welcome))
        if self.offset is None:
            self.offset = self.high = welcome["offset"]
            self.epoch = welcome["epoch"]
        else:
            await ws.send(encode({"type": "resume", "since": self.offset, "epoch": self.epoch}, ws.subprotocol))
            behind = offset_key(welcome["offset"]) > offset_key(self.offset)
            self.gap_end = welcome["offset"] if behind else None
            say(f"resuming after offset {self.offset}")
        while True:
            self.handle(decode(await ws.recv()))

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "events":
            for event in msg.get("events", []):
                self.on_event(event)
        elif kind == "resume_failed":
            say(describe_resume_failed(msg))
            self.offset = self.high = msg["offset"]
            self.epoch = msg.get("epoch") or self.epoch
            self.gap_end = None
        elif kind == "error":
            say(f"error {msg.get('code')}: {msg.get('message')}")
        elif kind != "pong":
            say(f"message {kind}: {msg}")

    def on_event(self, event: dict[str, Any]) -> None:
        offset = event.get("offset")
        if offset is None:  # presence and leaderboard are snapshots, not stream events
            say(describe_event(event, self.gift_names))
            return
        if self.seen.add(offset):
            say(describe_event(event, self.gift_names))
        if self.high is None or offset_key(offset) > offset_key(self.high):
            self.high = offset
        if self.gap_end is None or offset == self.gap_end:
            self.gap_end = None
            self.offset = self.high


class GiftRun:
    """Sends gifts with fresh ids; a gift without a reply is resent with the same id after a reconnect."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        run = uuid.uuid4().hex[:10]
        self.unsent = [f"cli-{run}-{i}" for i in range(1, args.repeat + 1)]
        self.unsent.reverse()  # pop() from the end sends them in order
        # Sent, no ack or final error yet: resent on every new connection.
        self.pending: dict[str, dict[str, Any]] = {}
        self.acked = self.replayed = self.failed = self.acks_seen = 0
        self.balance: int | None = None
        self.backoff = Backoff()
        self.retries: set[asyncio.Task[None]] = set()

    def frame(self, gid: str) -> dict[str, Any]:
        return {"type": "gift", "id": gid, "gift": self.args.gift, "count": self.args.count}

    async def run(self) -> int:
        while self.unsent or self.pending:
            advised = None
            try:
                async with await connect(self.args) as ws:
                    await self.session(ws)
                    continue
            except ConnectionClosed as exc:
                code, reason, advised = close_info(exc)
                if code in STOP_CODES:
                    say(f"closed {code}: {reason or STOP_CODES[code]}; {len(self.pending)} gift(s) unconfirmed")
                    self.failed += len(self.pending) + len(self.unsent)
                    break
                say(f"disconnected ({code} {reason}); {len(self.pending)} gift(s) unconfirmed, reconnecting")
            except CONNECT_ERRORS as exc:
                say(f"cannot connect ({type(exc).__name__})")
            if self.backoff.attempts >= GIFT_MAX_ATTEMPTS:
                say("giving up")
                self.failed += len(self.pending) + len(self.unsent)
                break
            await self.backoff.wait(advised)
        tail = f"; balance {self.balance}" if self.balance is not None else ""
        say(f"done: {self.acked} acked ({self.replayed} replayed), {self.failed} failed{tail}")
        return 0 if self.failed == 0 else 1

    async def session(self, ws: Any) -> None:
        await read_welcome(ws)
        self.backoff.reset()
        for gid, frame in self.pending.items():
            say(f"resend {gid} (same id: the server charges it at most once)")
            await ws.send(encode(frame, ws.subprotocol))
        sender = asyncio.get_running_loop().create_task(self.send_loop(ws))
        try:
            while self.unsent or self.pending:
                self.on_reply(ws, decode(await ws.recv()))
        finally:
            sender.cancel()
            for task in self.retries:
                task.cancel()
            await asyncio.gather(sender, *self.retries, return_exceptions=True)

    async def send_loop(self, ws: Any) -> None:
        while self.unsent:
            gid = self.unsent.pop()
            # Pending before it is sent: if the send fails, the reconnect resends it.
            self.pending[gid] = self.frame(gid)
            await ws.send(encode(self.pending[gid], ws.subprotocol))
            if self.args.rate > 0:
                await asyncio.sleep(1 / self.args.rate)

    async def resend_later(self, ws: Any, gid: str) -> None:
        await asyncio.sleep(1.0)
        if gid in self.pending:
            await ws.send(encode(self.pending[gid], ws.subprotocol))

    def on_reply(self, ws: Any, msg: dict[str, Any]) -> None:
        gid = msg.get("id")
        if msg.get("type") not in ("ack", "error") or gid not in self.pending:
            return  # room events and stray replies are not ours to count
        if msg["type"] == "ack":
            self.acks_seen += 1
            if self.acks_seen == self.args.drop_ack:
                say(f"(dropping the connection before reading the ack of {gid}, as a flaky network would)")
                ws.transport.abort()
                return
            del self.pending[gid]
            self.acked += 1
            self.replayed += bool(msg.get("replayed"))
            self.balance = msg.get("balance")
            note = " (replayed: charged once, earlier)" if msg.get("replayed") else ""
            say(f"ack {gid}: {msg.get('gift_id')} balance {msg.get('balance')}{note}")
        elif msg.get("code") in RETRYABLE:
            say(f"error {gid}: {msg.get('code')}: {msg.get('message')}; retrying with the same id")
            task = asyncio.get_running_loop().create_task(self.resend_later(ws, gid))
            self.retries.add(task)
            task.add_done_callback(self.retries.discard)
        else:
            del self.pending[gid]
            self.failed += 1
            say(f"error {gid}: {msg.get('code')}: {msg.get('message')}")


# --- HTTP commands --------------------------------------------------------------------------------


def http(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=15) as client:
        r = client.request(method, path, json=body)
    try:
        data = r.json()
    except ValueError:
        data = {"code": "http_" + str(r.status_code), "message": r.text[:200]}
    if r.status_code >= 400:
        raise SystemExit(f"error {r.status_code} {data.get('code')}: {data.get('message')}")
    return data  # type: ignore[no-any-return]


def cmd_recharge(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"payment_method": args.method, "idempotency_key": args.key or uuid.uuid4().hex}
    if args.package:
        body["package_id"] = args.package
    else:
        body["coins"] = args.coins
    o = http(args, "POST", "/v1/recharges", body)
    price = f"{o['price_cents'] / 100:.2f} {o['currency']}"
    say(f"order {o['order_id']} {o['status']}: {o['coins']} coins ({o['package_id']}, {price}), "
        f"key {o['idempotency_key']}; balance {o.get('balance', '(pending)')}")
    return 0


def cmd_wallet(args: argparse.Namespace) -> int:
    w = http(args, "GET", "/v1/wallet")
    budget = w["monthly_budget"] if w["monthly_budget"] is not None else "none"
    say(f"{w['user_id']}: {w['coins']} coins; spent this month {w['month_spent']}; monthly budget {budget}")
    return 0


def cmd_room(args: argparse.Namespace) -> int:
    r = http(args, "GET", f"/v1/rooms/{args.room}")
    say(f"room {r['room_id']}: {r['title']!r} hosted by {r['host']['name']} ({r['host']['id']}), "
        f"{'live' if r['live'] else 'ended'}, epoch {r['epoch']}")
    say(f"  {r['viewers']} watching, {r['gifts_total']} gifts, {r['coins_total']} coins")
    for i, t in enumerate(r["top_gifters"][:3], 1):
        say(f"  {i}. {t['name']} {t['coins']} coins")
    return 0


def cmd_create_room(args: argparse.Namespace) -> int:
    r = http(args, "POST", "/v1/rooms", {"title": args.title} if args.title else {})
    say(f"room {r['room_id']} created: {r['title']!r}, epoch {r['epoch']}, socket {r['ws']}")
    return 0


def cmd_end_room(args: argparse.Namespace) -> int:
    r = http(args, "POST", f"/v1/rooms/{args.room}/end")
    if r["offset"] is None:
        say(f"room {r['room_id']} was already ended")
    else:
        say(f"room {r['room_id']} ended at offset {r['offset']}")
    return 0


def cmd_earnings(args: argparse.Namespace) -> int:
    e = http(args, "GET", "/v1/me/earnings")
    say(f"{e['host_id']}: {e['diamonds']} diamonds ({e['diamond_units']} units of 1/{e['units_per_diamond']}) "
        f"from {e['gifts_received']} settled gifts")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    try:
        catalog = http(args, "GET", "/v1/catalog")
        names = {g["id"]: g["name"] for g in catalog["gifts"]}
    except (SystemExit, httpx.HTTPError):
        names = {}  # the watcher still works; it prints gift ids instead of names
    return asyncio.run(Watcher(args, names).run())


def cmd_gift(args: argparse.Namespace) -> int:
    return asyncio.run(GiftRun(args).run())


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("GIFTSTREAM_URL", "http://127.0.0.1:8000"))
    common.add_argument("--token", default=os.environ.get("GIFTSTREAM_TOKEN"))
    parser = argparse.ArgumentParser(prog="python -m client_demo.cli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help_text: str, room: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text)
        if room:
            p.add_argument("--room", required=True)
        p.set_defaults(fn=fn)
        return p

    watch = add("watch", cmd_watch, "print a room's events live; resumes after drops", room=True)
    watch.add_argument("--json", action="store_true", help="use giftstream.json instead of msgpack")
    gift = add("gift", cmd_gift, "send gifts; resends unconfirmed ones with the same ids", room=True)
    gift.add_argument("--gift", default="rose")
    gift.add_argument("--count", type=int, default=1)
    gift.add_argument("--repeat", type=int, default=1, help="how many gifts to send")
    gift.add_argument("--rate", type=float, default=10.0, help="gifts per second (0: as fast as possible)")
    gift.add_argument("--json", action="store_true", help="use giftstream.json instead of msgpack")
    gift.add_argument("--drop-ack", type=int, default=0, metavar="K",
                      help="demo: drop the connection instead of reading the K-th ack, then resend")
    recharge = add("recharge", cmd_recharge, "buy coins (sandbox payment)")
    what = recharge.add_mutually_exclusive_group(required=True)
    what.add_argument("--package", help="package id, e.g. coins_65")
    what.add_argument("--coins", type=int, help="custom amount of coins")
    recharge.add_argument("--key", help="idempotency key (default: a new one); reuse it to retry safely")
    recharge.add_argument("--method", default="sandbox_card", help="sandbox_card or sandbox_card_declined")
    add("wallet", cmd_wallet, "show your coin balance")
    add("room", cmd_room, "show a room's state", room=True)
    create = add("create-room", cmd_create_room, "open a live room (host token)")
    create.add_argument("--title")
    add("end-room", cmd_end_room, "end a live room (its host or an admin)", room=True)
    add("earnings", cmd_earnings, "show settled diamonds (host token)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.token is None and args.command not in ("room",):
        print("a token is needed: --token or $GIFTSTREAM_TOKEN", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except (httpx.HTTPError, InvalidURI) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
