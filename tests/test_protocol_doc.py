"""docs/protocol.md cannot drift: every example in it is sent to a real server.

The page's conventions (its "Examples" paragraph):
- an HTTP example is a fenced block whose first line is `METHOD /path`, then headers, a blank
  line and the body, followed by a fenced block whose first line is `HTTP <status>` and whose
  rest is the body (JSON, or Prometheus text for /metrics);
- a socket example is a fenced block holding one message, a JSON object with a `type`;
- the close-reason example is a fenced JSON object with `reason` and `reconnect`.

HTTP examples run in the page's order against one fresh server, so an example may rely on the
ones before it (a recharge key reused, a room ended twice). For each, the status must match,
every field shown must be there with a value of the same kind (dict, list, string, number,
bool; `null` on either side matches anything), a list shown with an item must come back with
one (checked like the first), and the fields in FIXED must be equal. Socket examples are
played by one scenario per message type (see `test_socket_examples`); the messages a client
sends are sent as written, so their ids come back too. The close-codes table is checked
against `server/errors.py`, and the closes the server sends against the table.

A block that fits none of these must be listed in NOT_TESTABLE with the reason; an example
the tests did not use fails `test_every_example_is_used`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pyotp
import pytest
import websockets

from server import errors
from server.payments import signature
from tests.support import ServerProc, token

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# Values that do not vary from one run to the next: the example's value must be the server's.
FIXED = frozenset({"type", "code", "message", "status", "reason", "reconnect", "replayed", "live", "store",
                   "redis", "database", "units_per_diamond", "currency", "role"})
# On the socket the client's ids are sent as written, and the users are the examples' own.
FIXED_SOCKET = FIXED | {"id"}

# First line of a fenced block -> why no test sends it. Empty: every block is an example.
NOT_TESTABLE: dict[str, str] = {}

REQUEST = re.compile(r"^(GET|POST|PUT|DELETE|PATCH) (/\S*)$")
RESPONSE = re.compile(r"^HTTP (\d{3})$")
PLACEHOLDER = re.compile(r"<[a-z_ ]+>")
SIGN = "\x00sign"

pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Block:
    line: int
    text: str

    @property
    def first(self) -> str:
        return self.text.split("\n", 1)[0].strip()

    def json(self) -> Any:
        try:
            return json.loads(self.text)
        except ValueError:
            return None


def doc_blocks() -> list[Block]:
    """Every fenced block of the page, dedented (blocks inside list items are indented)."""
    out: list[Block] = []
    lines = DOC.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)```", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        out.append(Block(start, textwrap.dedent("\n".join(body)).strip()))
        i += 1
    return out


@dataclass(frozen=True)
class HttpExample:
    request: Block
    response: Block


def classify() -> tuple[list[HttpExample], list[Block], list[Block]]:
    """(HTTP request/response pairs, socket messages, close reasons); fails on anything else."""
    blocks = doc_blocks()
    http: list[HttpExample] = []
    socket: list[Block] = []
    closes: list[Block] = []
    i = 0
    while i < len(blocks):
        b = blocks[i]
        value = b.json()
        if REQUEST.match(b.first):
            assert i + 1 < len(blocks) and RESPONSE.match(blocks[i + 1].first), \
                f"protocol.md:{b.line}: a request block must be followed by an 'HTTP <status>' block"
            http.append(HttpExample(b, blocks[i + 1]))
            i += 2
            continue
        if isinstance(value, dict) and "type" in value:
            socket.append(b)
        elif isinstance(value, dict) and "reconnect" in value:
            closes.append(b)
        else:
            assert b.first in NOT_TESTABLE, f"protocol.md:{b.line}: block {b.first!r} is no example the test knows"
        i += 1
    return http, socket, closes


def check(doc: Any, actual: Any, where: str, fixed: frozenset[str] = FIXED, key: str = "") -> None:
    """The server's value has every documented field, of the documented kind; FIXED ones equal."""
    if doc is None or actual is None:
        return
    if isinstance(doc, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for k, v in doc.items():
            assert k in actual, f"{where}: field {k!r} missing from {actual!r}"
            check(v, actual[k], f"{where}.{k}", fixed, k)
    elif isinstance(doc, list):
        assert isinstance(actual, list), f"{where}: expected a list, got {actual!r}"
        if doc:
            assert actual, f"{where}: the example shows items, the server sent none"
            check(doc[0], actual[0], f"{where}[0]", fixed, key)
    else:
        assert _kind(doc) == _kind(actual), f"{where}: {doc!r} documented, server sent {actual!r}"
        if key in fixed:
            assert doc == actual, f"{where}: {doc!r} documented, server sent {actual!r}"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, int | float) else type(value).__name__


def adult_token(user_id: str, role: str = "viewer", name: str | None = None) -> str:
    return token(user_id, role, name=name)


def minor_birthdate() -> str:
    today = dt.date.today()
    return today.replace(year=today.year - 10, day=min(today.day, 28)).isoformat()


# -- HTTP --------------------------------------------------------------------------------------


def substitute(text: str, values: dict[str, str], where: str) -> str:
    for name, value in values.items():
        text = text.replace(f"<{name}>", value)
    left = PLACEHOLDER.findall(text)
    assert not left, f"{where}: unknown placeholder {left}"
    return text


def parse_request(block: Block, values: dict[str, str]) -> tuple[str, str, dict[str, str], str]:
    text = substitute(block.text, values, f"protocol.md:{block.line}")
    head, _, body = text.partition("\n\n")
    lines = head.split("\n")
    m = REQUEST.match(lines[0].strip())
    assert m
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        assert sep, f"protocol.md:{block.line}: header line {line!r}"
        headers[name.strip().lower()] = value.strip()
    if body:
        headers["content-type"] = "application/json"
    return m.group(1), m.group(2), headers, body


def check_response(block: Block, r: httpx.Response) -> None:
    where = f"protocol.md:{block.line}"
    status_line, _, body = block.text.partition("\n")
    status = int(RESPONSE.match(status_line.strip()).group(1))  # type: ignore[union-attr]
    assert r.status_code == status, f"{where}: documented {status}, server said {r.status_code}: {r.text}"
    if status == 405:
        assert "allow" in r.headers, f"{where}: a 405 names the methods the path takes"
    try:
        documented = json.loads(body)
    except ValueError:
        # Prometheus text: each documented line's metric (or comment line) is in the answer.
        got = r.text.split("\n")
        for line in body.strip().split("\n"):
            if line.startswith("#"):
                assert line in got, f"{where}: {line!r} not in /metrics"
            else:
                name = line.split()[0]
                assert any(g.split(" ")[0].split("{")[0] == name for g in got), f"{where}: no {name} in /metrics"
        return
    check(documented, r.json(), where)


async def test_http_examples(server: ServerProc) -> None:
    http, _, _ = classify()
    assert http, "protocol.md has no HTTP examples"
    viewer = adult_token("alice", name="Alice")
    host = adult_token("demo_host", "host", name="Demo Host")
    # A second host: the first one is live in <room_id> (one live room per host).
    values = {"viewer_token": viewer, "host_token": host, "admin_token": adult_token("support", "admin"),
              "other_host_token": adult_token("late_host", "host", name="Late Host"),
              "minor_token": token("kid", birthdate=minor_birthdate()), "room_id": ""}
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        # A room with a gift in it, so every list in the examples has an item to compare.
        r = await client.post("/v1/rooms", json={"title": "Demo LIVE"}, headers={"authorization": f"Bearer {host}"})
        values["room_id"] = room = r.json()["room_id"]
        r = await client.post("/v1/recharges", headers={"authorization": f"Bearer {viewer}"},
                              json={"package_id": "coins_65", "payment_method": "sandbox_card",
                                    "idempotency_key": "setup"})
        assert r.status_code == 201, r.text
        async with Socket.join(server, room, viewer) as sock:
            await sock.send({"type": "gift", "id": "setup-1", "gift": "rose", "count": 1})
            assert (await sock.next(lambda m: m.get("id") == "setup-1"))["type"] == "ack"
        await until(lambda: _coins_total(client, room))
        # Diamonds for the cash-out examples (a withdrawal is 10,000 at least): a lion, 14,999.5.
        patron = adult_token("patron", name="Patron")
        r = await client.post("/v1/recharges", headers={"authorization": f"Bearer {patron}"},
                              json={"coins": 29_999, "payment_method": "sandbox_card", "idempotency_key": "setup"})
        assert r.status_code == 201, r.text
        async with Socket.join(server, room, patron) as sock:
            await sock.send({"type": "gift", "id": "setup-2", "gift": "lion", "count": 1})
            assert (await sock.next(lambda m: m.get("id") == "setup-2"))["type"] == "ack"

        # `<signature>`: the example's body signed now with the server's webhook secret.
        values["signature"] = SIGN
        webhook_secret = (server.data_dir / "webhook_secret").read_text().strip()
        # `<totp>`: a code of the two-factor secret the last enrolment answered, of a time step the
        # server has not taken (it takes each once, and only later ones): the step after the last
        # one a 2xx answer took, or now's. `<used_totp>`: the code of that last one.
        taken = 0
        for ex in http:
            uses_totp = "<totp>" in ex.request.text
            if uses_totp:
                step = max(taken + 1, int(time.time()) // 30)
                values["totp"] = pyotp.TOTP(values["totp_secret"]).at(step * 30)
            method, path, headers, body = parse_request(ex.request, values)
            if method == "GET":
                # A GET may show settled figures (a video's gift list): settlement follows an ack by
                # about a second, so the examples before it are settled first.
                await until(lambda: _settled(client))
            if headers.get("giftstream-signature") == SIGN:
                headers["giftstream-signature"] = signature.sign(webhook_secret, body.encode(), int(time.time()))
            r = await client.request(method, path, headers=headers, content=body.encode() or None)
            check_response(ex.response, r)
            if uses_totp and r.is_success:
                taken, values["used_totp"] = step, values["totp"]
            # `<order_id>`, `<payment_id>`, `<video_id>`, `<withdrawal_id>`: those of the last answer
            # that named one.
            got = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
            if isinstance(got, dict):
                values.update({k: got[k] for k in ("order_id", "payment_id", "video_id", "withdrawal_id")
                               if isinstance(got.get(k), str)})
                if isinstance(got.get("secret"), str):
                    values["totp_secret"] = got["secret"]


async def _settled(client: httpx.AsyncClient) -> bool:
    """The outbox is empty: every acknowledged movement is in the ledger."""
    return bool((await client.get("/healthz")).json().get("outbox_entries") == 0)


async def _coins_total(client: httpx.AsyncClient, room: str) -> bool:
    return bool((await client.get(f"/v1/rooms/{room}")).json()["coins_total"])


async def until(condition: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# -- the room socket -------------------------------------------------------------------------


class Socket:
    """A room socket that decodes both subprotocols and keeps what it read."""

    def __init__(self, ws: Any, subprotocol: str) -> None:
        self.ws = ws
        self.subprotocol = subprotocol
        self.seen: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] = {}

    @classmethod
    def join(cls, server: ServerProc, room: str, user_token: str, subprotocol: str = "giftstream.json") -> Any:
        import contextlib

        @contextlib.asynccontextmanager
        async def joined() -> Any:
            url = f"{server.ws_base}/v1/rooms/{room}/ws?token={user_token}"
            async with websockets.connect(url, subprotocols=[subprotocol], max_size=None) as ws:  # type: ignore[list-item]
                sock = cls(ws, subprotocol)
                sock.welcome = await sock.recv()
                yield sock

        return joined()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message) if self.subprotocol == "giftstream.json" else msgpack.packb(message))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        msg: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else msgpack.unpackb(raw)
        self.seen.append(msg)
        return msg

    async def next(self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            msg = await self.recv(max(0.01, deadline - time.monotonic()))
            if match(msg):
                return msg

    async def event(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first room event of this kind (with these fields), read so far or from now on."""
        def found() -> dict[str, Any] | None:
            for m in self.seen:
                for e in m.get("events", []) if m["type"] == "events" else []:
                    if e["type"] == kind and all(e.get(k) == v for k, v in fields.items()):
                        return e  # type: ignore[no-any-return]
            return None

        deadline = time.monotonic() + timeout
        while (e := found()) is None:
            await self.recv(max(0.01, deadline - time.monotonic()))
        return e

    async def closed(self, timeout: float = 10.0) -> tuple[int, str]:
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await self.recv(timeout)
        rcvd = info.value.rcvd
        assert rcvd is not None, "the server sent no close frame"
        return rcvd.code, rcvd.reason


async def close_of(server: ServerProc, room: str, user_token: str) -> tuple[int, str]:
    url = f"{server.ws_base}/v1/rooms/{room}/ws?token={user_token}"
    async with websockets.connect(url, subprotocols=["giftstream.json"]) as ws:  # type: ignore[list-item]
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 10)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


@dataclass(frozen=True)
class CloseRow:
    code: int
    name: str
    reason: str | None
    reconnect: bool | None
    retry: tuple[int, int] | None


def close_table() -> list[CloseRow]:
    text = DOC.read_text().split("## Close codes", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in text.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or not cells[0].isdigit():
            continue
        reason = cells[3][1:-1] if re.fullmatch(r"`[^`]+`", cells[3]) else None
        reconnect = {"true": True, "false": False}.get(cells[4])
        retry = tuple(int(x) for x in cells[5].split("-")) if cells[5] else None
        rows.append(CloseRow(int(cells[0]), cells[1], reason, reconnect, retry))  # type: ignore[arg-type]
    return rows


def check_close(code: int, reason: str, where: str) -> dict[str, Any]:
    """A close the server sent: JSON advice, as its row of the close table says."""
    advice = json.loads(reason)
    assert isinstance(advice, dict) and set(advice) <= {"reason", "reconnect", "retry_ms"}, f"{where}: {reason!r}"
    rows = [r for r in close_table() if r.code == code and r.reconnect is not None]
    assert len(rows) == 1, f"{where}: close code {code} has no row with advice in the close table"
    row = rows[0]
    assert advice["reconnect"] is row.reconnect, f"{where}: {advice}"
    if row.reason is not None:
        assert advice["reason"] == row.reason, f"{where}: {advice}"
    if row.retry is None:
        assert "retry_ms" not in advice, f"{where}: {advice}"
    else:
        assert row.retry[0] <= advice["retry_ms"] <= row.retry[1], f"{where}: {advice}"
    return advice  # type: ignore[no-any-return]


def test_close_table_is_errors_py() -> None:
    """Each close the server sends is a `Disconnect` in server/errors.py, and the table says its
    code, reason, advice and retry_ms range as defined there."""
    rows = {r.name: r for r in close_table()}
    constants = {name: d for name, d in vars(errors).items() if isinstance(d, errors.Disconnect)}
    assert constants
    for name, d in constants.items():
        assert name in rows, f"close {name} ({d.code}) is not in protocol.md's close table"
        row = rows[name]
        assert row.code == d.code and row.reconnect is d.reconnect, (name, row, d)
        if row.reason is not None:
            assert row.reason == d.reason, (name, row, d)
        expected = None if d.retry_ms is None else (d.retry_ms, d.retry_ms + max(d.spread_ms - 1, 0))
        assert row.retry == expected, (name, row, d)


async def test_socket_examples(server: ServerProc) -> None:
    _, socket_examples, _ = classify()
    by_type: dict[str, list[Block]] = {}
    for b in socket_examples:
        by_type.setdefault(b.json()["type"], []).append(b)
    used: set[int] = set()

    def example(kind: str, match: Callable[[Block], bool] = lambda b: True) -> dict[str, Any]:
        found = [b for b in by_type.get(kind, []) if match(b)]
        assert len(found) == 1, f"protocol.md: expected one {kind} example, found {len(found)}"
        used.add(found[0].line)
        return found[0].json()  # type: ignore[no-any-return]

    def compare(kind: str, actual: dict[str, Any], match: Callable[[Block], bool] = lambda b: True) -> None:
        check(example(kind, match), actual, f"socket example {kind}", FIXED_SOCKET)

    host = adult_token("demo_host", "host", name="Demo Host")
    alice = adult_token("alice", name="Alice")
    carol = adult_token("carol", name="Carol")
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        room = (await client.post("/v1/rooms", json={}, headers={"authorization": f"Bearer {host}"})).json()["room_id"]
        r = await client.post("/v1/recharges", headers={"authorization": f"Bearer {alice}"},
                              json={"package_id": "coins_65", "payment_method": "sandbox_card", "idempotency_key": "a"})
        assert r.status_code == 201, r.text

        async with Socket.join(server, room, alice) as sock:
            compare("welcome", sock.welcome)
            first_offset = sock.welcome["offset"]

            gift = example("gift")
            await sock.send(gift)
            compare("ack", await sock.next(lambda m: m.get("id") == gift["id"]))
            events = example("events", lambda b: '"type": "gift"' in b.text)
            for item in events["events"]:
                check(item, await sock.event(item["type"]), f"events item {item['type']}", FIXED_SOCKET)

            # A LIVE goal of one rose: the next rose reaches it, and its `done` event follows.
            r = await client.put(f"/v1/rooms/{room}/goal", json={"gift": "rose", "count": 1},
                                 headers={"authorization": f"Bearer {host}"})
            assert r.status_code == 200, r.text
            await sock.send({"type": "gift", "id": "goal-1", "gift": "rose", "count": 1})
            goal = example("events", lambda b: '"type": "goal"' in b.text)["events"][0]
            check(goal, await sock.event("goal", done=True), "events item goal", FIXED_SOCKET)

            # A balance change that is not alice's own gift reaches her socket: a recharge.
            r = await client.post("/v1/recharges", headers={"authorization": f"Bearer {alice}"},
                                  json={"package_id": "coins_65", "payment_method": "sandbox_card",
                                        "idempotency_key": "b"})
            assert r.status_code == 201, r.text
            compare("wallet", await sock.next(lambda m: m["type"] == "wallet"))

            ping = example("ping")
            await sock.send(ping)
            compare("pong", await sock.next(lambda m: m["type"] == "pong"))

            # As written: its epoch is not this room's, so the answer is resume_failed.
            await sock.send(example("resume", lambda b: "<" not in b.text))
            compare("resume_failed", await sock.next(lambda m: m["type"] == "resume_failed"))

            async with Socket.join(server, room, carol) as broke:
                refused = example("error")
                await broke.send({"type": "gift", "id": refused["id"], "gift": "rose", "count": 1})
                compare("error", await broke.next(lambda m: m.get("id") == refused["id"]))

            # "How to resume", on a second socket (msgpack: the same maps): the gap is replayed.
            gift_offset = (await sock.event("gift"))["offset"]
            async with Socket.join(server, room, alice, "giftstream.msgpack") as again:
                how = example("resume", lambda b: "<" in b.text)
                text = json.dumps(how).replace("<last offset>", first_offset).replace("<epoch>", sock.welcome["epoch"])
                await again.send(json.loads(text))
                await again.event("gift", offset=gift_offset)

            # The host ends the room: room_ended, then the 4410 close with its advice.
            r = await client.post(f"/v1/rooms/{room}/end", headers={"authorization": f"Bearer {host}"})
            assert r.status_code == 200, r.text
            ended = example("events", lambda b: "room_ended" in b.text)
            check(ended["events"][0], await sock.event("room_ended"), "events item room_ended", FIXED_SOCKET)
            code, reason = await sock.closed()
            assert code == 4410, (code, reason)
            check_close(code, reason, "room ended")

        # Closes at the door: a bad token, a room that is not live.
        code, reason = await close_of(server, room, "not-a-token")
        assert code == 4401
        assert check_close(code, reason, "bad token")["reason"] == "invalid token"
        code, reason = await close_of(server, room, alice)
        assert code == 4404
        check_close(code, reason, "ended room")

    missing = [b.line for b in socket_examples if b.line not in used]
    assert not missing, f"socket examples at protocol.md lines {missing} were not played"


async def test_close_example(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    """The close-reason example: a draining node closes its room sockets with 1001 and advice."""
    _, _, closes = classify()
    assert len(closes) == 1, "protocol.md: expected one close-reason example"
    documented = closes[0].json()
    server = make_server(redis_url=redis_url).start()
    host = adult_token("demo_host", "host", name="Demo Host")
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as client:
        room = (await client.post("/v1/rooms", json={}, headers={"authorization": f"Bearer {host}"})).json()["room_id"]
    async with Socket.join(server, room, adult_token("alice", name="Alice")) as sock:
        stopping = asyncio.get_running_loop().run_in_executor(None, server.terminate)
        code, reason = await sock.closed(30)
        await stopping
    assert code == 1001, (code, reason)
    advice = check_close(code, reason, "drain")
    check(documented, advice, f"protocol.md:{closes[0].line}")


def test_every_example_is_used() -> None:
    """Each block is an HTTP pair, a socket message or the close example (or NOT_TESTABLE);
    each socket message type has a scenario in test_socket_examples."""
    http, socket, closes = classify()
    played = {"gift", "ping", "resume", "welcome", "ack", "error", "events", "pong", "resume_failed", "wallet"}
    kinds = {b.json()["type"] for b in socket}
    assert kinds <= played, f"socket examples without a scenario: {kinds - played}"
    assert http and socket and closes
