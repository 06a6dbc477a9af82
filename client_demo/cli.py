"""Terminal client for Giftstream: host or watch a room, send gifts, recharge.

    python -m client_demo host   --room demo --token "$GIFTSTREAM_HOST_TOKEN"
    python -m client_demo viewer --room demo --token "$GIFTSTREAM_VIEWER_TOKEN"
    python -m client_demo gift   --room demo --token "$GIFTSTREAM_VIEWER_TOKEN" --gift rose --count 5

`--url` defaults to $GIFTSTREAM_URL (else http://127.0.0.1:8000); `--token` to
$GIFTSTREAM_HOST_TOKEN for `host`, $GIFTSTREAM_VIEWER_TOKEN for `viewer`, else
$GIFTSTREAM_TOKEN. The room socket is client_demo/client.py (resume, resends with the same
id, close advice); the wire protocol is docs/protocol.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import uuid
from typing import Any

import httpx

from client_demo._wire import JSON, MSGPACK, STOP_CODES, describe_event, describe_resume_failed, describe_welcome
from client_demo.client import ClientError, GiftRefused, RoomClient, RoomClosed


def say(line: str) -> None:
    print(line, flush=True)


def room_client(args: argparse.Namespace) -> RoomClient:
    return RoomClient(args.url, args.room, args.token, subprotocol=JSON if args.json else MSGPACK,
                      max_tries=args.tries)


def closed_line(exc: RoomClosed) -> str:
    return f"closed {exc.advice.code}: {exc.advice.reason or STOP_CODES.get(exc.advice.code, '')}"


class Watcher:
    """Prints a room's events; the client resumes after drops, so each stored event prints once.
    Stops when the room ends, after `--for` seconds or after `--until-gifts` gift events."""

    def __init__(self, args: argparse.Namespace, gift_names: dict[str, str]) -> None:
        self.args = args
        self.gift_names = gift_names
        self.gifts = 0

    async def run(self) -> int:
        try:
            async with asyncio.timeout(self.args.for_s):
                return await self.watch()
        except TimeoutError:
            say(f"stopped after {self.args.for_s:g}s")
            return 0

    async def watch(self) -> int:
        client = room_client(self.args)
        try:
            await client.start()
            async for item in client.feed():
                if self.show(item):
                    return 0
        except RoomClosed as exc:
            say(closed_line(exc))
            return 0 if exc.advice.code == 4410 else 1
        except ClientError as exc:
            say(f"giving up: {exc}")
            return 1
        finally:
            await client.close()
        return 0

    def show(self, item: dict[str, Any]) -> bool:
        """Print one feed item; True when `--until-gifts` is reached."""
        kind = item.get("type")
        if kind == "connected":
            say(describe_welcome(item))
            if item.get("resumed"):
                say(f"resuming after offset {item.get('since')}")
        elif kind == "disconnected":
            say(f"disconnected ({item['code']} {item['reason']}); reconnecting in {item['wait_s']:.1f}s")
        elif kind == "unreachable":
            say(f"cannot reach {item['url']} ({item['error']}); retrying in {item['wait_s']:.1f}s")
        elif kind == "resume_failed":
            say(describe_resume_failed(item))
        elif kind == "error":
            say(f"error {item.get('code')}: {item.get('message')}")
        elif kind in ("resent", "message"):
            pass
        else:
            say(describe_event(item, self.gift_names))
            self.gifts += kind == "gift"
        return bool(self.args.until_gifts) and self.gifts >= self.args.until_gifts


class GiftRun:
    """Sends `--repeat` gifts with fresh ids at `--rate`; the client retries each with its own id
    until it is answered for good, across reconnects."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = uuid.uuid4().hex[:10]
        self.acked = self.replayed = self.failed = self.acks_seen = 0
        self.balance: int | None = None

    async def run(self) -> int:
        client = room_client(self.args)
        client.lose_reply = self.lose_reply
        try:
            await client.start()
        except RoomClosed as exc:
            say(f"{closed_line(exc)}; {self.args.repeat} gift(s) not sent")
            return 1
        except ClientError as exc:
            say(f"giving up: {exc}")
            return 1
        notices = asyncio.get_running_loop().create_task(self.notices(client))
        try:
            sends = []
            for i in range(1, self.args.repeat + 1):
                sends.append(asyncio.get_running_loop().create_task(self.send(client, f"cli-{self.run_id}-{i}")))
                if self.args.rate > 0 and i < self.args.repeat:
                    await asyncio.sleep(1 / self.args.rate)
            await asyncio.gather(*sends)
        finally:
            notices.cancel()
            await client.close()
        tail = f"; balance {self.balance}" if self.balance is not None else ""
        say(f"done: {self.acked} acked ({self.replayed} replayed), {self.failed} failed{tail}")
        return 0 if self.failed == 0 else 1

    async def send(self, client: RoomClient, gid: str) -> None:
        try:
            ack = await client.gift(self.args.gift, self.args.count, gift_id=gid)
        except GiftRefused as exc:
            self.failed += 1
            say(f"error {gid}: {exc.code}: {exc.message}")
            return
        except RoomClosed as exc:
            self.failed += 1
            say(f"{closed_line(exc)}; {gid} unconfirmed")
            return
        except ClientError as exc:
            self.failed += 1
            say(f"giving up on {gid}: {exc}")
            return
        self.acked += 1
        self.replayed += bool(ack.get("replayed"))
        balance = ack.get("balance")
        if isinstance(balance, int):  # acks may come out of order: the last charge leaves the least
            self.balance = balance if self.balance is None else min(self.balance, balance)
        note = " (replayed: charged once, earlier)" if ack.get("replayed") else ""
        say(f"ack {gid}: {ack.get('gift_id')} balance {ack.get('balance')}{note}")

    async def notices(self, client: RoomClient) -> None:
        with contextlib.suppress(ClientError):
            async for item in client.feed():
                kind = item.get("type")
                if kind == "resent":
                    for gid in item["ids"]:
                        say(f"resend {gid} (same id: the server charges it at most once)")
                elif kind == "disconnected":
                    say(f"disconnected ({item['code']} {item['reason']}); reconnecting in {item['wait_s']:.1f}s")
                elif kind == "unreachable":
                    say(f"cannot reach {item['url']} ({item['error']}); retrying in {item['wait_s']:.1f}s")

    def lose_reply(self, msg: dict[str, Any]) -> bool:
        """`--drop-ack K`: lose the K-th ack as a flaky network would; the gift goes again."""
        if msg.get("type") != "ack" or not self.args.drop_ack:
            return False
        self.acks_seen += 1
        if self.acks_seen != self.args.drop_ack:
            return False
        say(f"(dropping the connection before reading the ack of {msg.get('id')}, as a flaky network would)")
        return True


# --- HTTP commands --------------------------------------------------------------------------------


def http(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=15) as client:
            r = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {args.url} ({type(exc).__name__}: {exc}); is `giftstream serve` "
                         "running there? check --url") from None
    try:
        data = r.json()
    except ValueError:
        data = {"code": "http_" + str(r.status_code), "message": r.text[:200]}
    if r.status_code >= 400:
        # The details an error carries beside code and message (already_live's room_id).
        extra = "".join(f"; {k} {v}" for k, v in data.items() if k not in ("code", "message"))
        raise SystemExit(f"error {r.status_code} {data.get('code')}: {data.get('message')}{extra}")
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
        f"from {e['gifts_received']} settled gifts; held {e['held']}, reserved {e['reserved']}, "
        f"paid out {e['paid_out']}, lifetime {e['lifetime']}")
    return 0


def catalog_of(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return http(args, "GET", "/v1/catalog")
    except SystemExit:
        return {}  # the room still works; gifts show as ids instead of names


def names_of(catalog: dict[str, Any]) -> dict[str, str]:
    return {g["id"]: g["name"] for g in catalog.get("gifts", [])}


def cmd_watch(args: argparse.Namespace) -> int:
    return asyncio.run(Watcher(args, names_of(catalog_of(args))).run())


def cmd_gift(args: argparse.Namespace) -> int:
    return asyncio.run(GiftRun(args).run())


def cmd_live(args: argparse.Namespace) -> int:
    """`host` or `viewer`: the live screen (rich), or printed lines with --plain."""
    from client_demo.live import LiveRoom, RoomView, gift_keys

    catalog = catalog_of(args)
    view = RoomView(args.command, names_of(catalog))
    keys: dict[str, dict[str, Any]] = {}
    if args.command == "host":
        room = http(args, "GET", f"/v1/rooms/{args.room}")
        view.gifts, view.coins, view.top = room["gifts_total"], room["coins_total"], room["top_gifters"]
    else:
        view.balance = http(args, "GET", "/v1/wallet")["coins"]
        keys = gift_keys(catalog)
    plain = args.plain or not sys.stdout.isatty()
    if plain:
        say(f"{args.command} of room {args.room} at {args.url}" + (
            f"; balance {view.balance}; keys: " + ", ".join(f"{k} {g['id']}" for k, g in keys.items()) + ", q quit"
            if keys else ""))

    async def run() -> int:
        client = room_client(args)
        try:
            await client.start()
        except RoomClosed as exc:
            say(closed_line(exc))
            return 1
        except ClientError as exc:
            say(f"giving up: {exc}")
            return 1
        try:
            return await LiveRoom(client, view, keys, plain, say).run()
        finally:
            await client.close()

    return asyncio.run(run())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client_demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Any, help_text: str, room: bool = False, socket: bool = False,
            token_env: str = "GIFTSTREAM_TOKEN") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default=os.environ.get("GIFTSTREAM_URL", "http://127.0.0.1:8000"),
                       help="the server ($GIFTSTREAM_URL, default http://127.0.0.1:8000)")
        p.add_argument("--token", default=os.environ.get(token_env) or os.environ.get("GIFTSTREAM_TOKEN"),
                       help=f"a token from `giftstream token` or the serve banner (${token_env})")
        if room:
            p.add_argument("--room", required=True)
        if socket:
            p.add_argument("--json", action="store_true", help="use giftstream.json instead of msgpack")
            p.add_argument("--tries", type=int, default=10,
                           help="connection attempts in a row before giving up (default 10, about 30 s)")
        p.set_defaults(fn=fn)
        return p

    host = add("host", cmd_live, "the host's live screen: feed, totals, goal, top gifters", room=True, socket=True,
               token_env="GIFTSTREAM_HOST_TOKEN")
    host.add_argument("--plain", action="store_true", help="print lines instead of drawing the screen")
    viewer = add("viewer", cmd_live, "the viewer's live screen: feed, balance, a key per gift", room=True,
                 socket=True, token_env="GIFTSTREAM_VIEWER_TOKEN")
    viewer.add_argument("--plain", action="store_true", help="print lines; keys are read from stdin lines")
    watch = add("watch", cmd_watch, "print a room's events live; resumes after drops", room=True, socket=True)
    watch.add_argument("--for", dest="for_s", type=float, metavar="S", help="stop after S seconds")
    watch.add_argument("--until-gifts", type=int, default=0, metavar="N", help="stop after N gift events")
    gift = add("gift", cmd_gift, "send gifts; resends unconfirmed ones with the same ids", room=True, socket=True)
    gift.add_argument("--gift", default="rose")
    gift.add_argument("--count", type=int, default=1)
    gift.add_argument("--repeat", type=int, default=1, help="how many gifts to send")
    gift.add_argument("--rate", type=float, default=10.0, help="gifts per second (0: as fast as possible)")
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
    add("earnings", cmd_earnings, "show your diamonds: available, held, reserved, paid out (host token)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.token is None and args.command not in ("room",):
        print("a token is needed: --token, or $GIFTSTREAM_TOKEN (the serve banner prints export lines)",
              file=sys.stderr)
        return 2
    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
