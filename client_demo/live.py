"""The terminal host and viewer: `python -m client_demo host|viewer`.

The host sees the live feed, the room's totals, goal progress (when `goal` events arrive) and
the top gifters; the viewer sees the feed and their balance, and sends a gift per key (one key
per catalog gift, shown on screen). On a terminal the screen is drawn with rich; with `--plain`,
or when stdout is not a terminal, each change is one printed line and the viewer reads keys
from stdin lines, so scripts and tests can drive both.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from client_demo._wire import describe_event, describe_resume_failed, describe_welcome
from client_demo.client import ClientError, GiftRefused, RoomClient, RoomClosed

KEYS = "1234567890abcdefghijklmnoprstuvwxyz"  # no q: q quits


@dataclass
class RoomView:
    """What the screen shows, updated from the client's feed; `apply` also returns the line
    that plain mode prints."""

    role: str
    gift_names: dict[str, str]
    viewers: int = 0
    gifts: int = 0
    coins: int = 0
    top: list[dict[str, Any]] = field(default_factory=list)
    goal: dict[str, Any] | None = None
    balance: int | None = None
    status: str = "connecting"
    feed: deque[str] = field(default_factory=lambda: deque(maxlen=14))

    def apply(self, item: dict[str, Any]) -> str | None:
        kind = item.get("type")
        line: str | None
        if kind == "connected":
            self.status, self.viewers = "connected", int(item.get("viewers") or 0)
            line = describe_welcome(item)
        elif kind == "disconnected":
            self.status = "reconnecting"
            line = f"disconnected ({item['code']} {item['reason']}); reconnecting in {item['wait_s']:.1f}s"
        elif kind == "unreachable":
            self.status = "reconnecting"
            line = f"cannot reach {item['url']} ({item['error']}); try {item['tries']}, again in {item['wait_s']:.1f}s"
        elif kind == "resume_failed":
            self.viewers, self.coins = int(item.get("viewers") or 0), int(item.get("coins_total") or 0)
            self.top = list(item.get("top_gifters") or [])
            line = describe_resume_failed(item)
        elif kind == "gift":
            self.gifts += 1
            self.coins += int(item.get("coins") or 0)
            line = describe_event(item, self.gift_names)
            if self.role == "host":
                line += f"  | total {self.gifts} gifts, {self.coins} coins"
        elif kind == "presence":
            self.viewers = int(item.get("viewers") or 0)
            line = describe_event(item, self.gift_names)
        elif kind == "leaderboard":
            self.top = list(item.get("top") or [])
            line = describe_event(item, self.gift_names)
        elif kind == "goal":
            self.goal = item
            line = "goal: " + describe_goal(item)
        elif kind == "room_ended":
            self.status = "room ended"
            line = "room ended"
        elif kind in ("resent", "error"):
            line = (f"resend {', '.join(item['ids'])} (same id: the server charges it at most once)"
                    if kind == "resent" else f"error {item.get('code')}: {item.get('message')}")
        else:
            line = None
        if line is not None and kind in ("gift", "goal", "room_ended", "resume_failed", "disconnected"):
            self.feed.append(line)
        return line


def describe_goal(goal: dict[str, Any]) -> str:
    progress, target = int(goal.get("progress") or 0), int(goal.get("target") or 0)
    pct = 100 * progress // target if target else 0
    return f"{progress}/{target} ({pct}%)" + (" done!" if goal.get("done") else "")


def gift_keys(catalog: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One key per catalog gift, in catalog order."""
    return dict(zip(KEYS, catalog.get("gifts", []), strict=False))


# --- drawing ------------------------------------------------------------------------------


def render(view: RoomView, room: str, keys: dict[str, dict[str, Any]]) -> Any:
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    parts: list[Any] = []
    head = f"[b]{room}[/b]  {view.status}  ·  {view.viewers} watching"
    if view.role == "host":
        head += f"  ·  {view.gifts} gifts, {view.coins} coins"
    if view.balance is not None:
        head += f"  ·  balance [b]{view.balance}[/b] coins"
    parts.append(Panel(head, title="giftstream " + view.role))
    if view.goal is not None:
        target = max(1, int(view.goal.get("target") or 1))
        parts.append(Panel(ProgressBar(total=target, completed=int(view.goal.get("progress") or 0)),
                           title="goal " + describe_goal(view.goal)))
    parts.append(Panel("\n".join(view.feed) or "(no gifts yet)", title="feed"))
    if view.role == "host" or view.top:
        top = Table(show_header=False, box=None)
        for i, t in enumerate(view.top[:5], 1):
            top.add_row(f"{i}.", str(t.get("name")), f"{t.get('coins')} coins")
        parts.append(Panel(top, title="top gifters"))
    if keys:
        tray = "  ".join(f"[b]{k}[/b] {g['name']} ({g['coins']})" for k, g in keys.items())
        parts.append(Panel(tray + "   [b]q[/b] quit", title="send a gift"))
    return Group(*parts)


@contextlib.contextmanager
def cbreak() -> Iterator[None]:
    """Keys without Enter, restored on exit."""
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


# --- running ------------------------------------------------------------------------------


class LiveRoom:
    """Feeds a RoomView from a RoomClient, draws it, and (viewer) turns keys into gifts."""

    def __init__(self, client: RoomClient, view: RoomView, keys: dict[str, dict[str, Any]], plain: bool,
                 say: Callable[[str], None]) -> None:
        self.client, self.view, self.keys, self.plain, self.say = client, view, keys, plain, say
        self.run_id = uuid.uuid4().hex[:8]
        self.sent = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.quit = asyncio.Event()
        self.live: Any = None

    async def run(self) -> int:
        if not self.plain:
            from rich.live import Live

            self.live = Live(render(self.view, self.client.room, self.keys), auto_refresh=False)
            self.live.start()
        reader = self._read_keys() if self.keys else None
        try:
            return await self._consume()
        finally:
            if reader is not None:
                reader()
            for task in self.tasks:
                task.cancel()
            if self.live is not None:
                self.live.stop()

    async def _consume(self) -> int:
        feed = self.client.feed()
        quit_wait = asyncio.get_running_loop().create_task(self.quit.wait())
        try:
            while True:
                nxt: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(anext(feed))
                waits: list[asyncio.Future[Any]] = [nxt, quit_wait]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    return 0
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return 0
                except RoomClosed as exc:
                    self.say(f"closed {exc.advice.code}: {exc.advice.reason}")
                    return 0 if exc.advice.code == 4410 else 1
                except ClientError as exc:
                    self.say(f"giving up: {exc}")
                    return 1
                self.show(self.view.apply(item))
        finally:
            quit_wait.cancel()

    def show(self, line: str | None) -> None:
        if self.plain:
            if line is not None:
                self.say(line)
        elif self.live is not None:
            self.live.update(render(self.view, self.client.room, self.keys), refresh=True)

    def press(self, key: str) -> None:
        if key == "q":
            self.quit.set()
            return
        gift = self.keys.get(key)
        if gift is None:
            return
        self.sent += 1
        gid = f"cli-{self.run_id}-{self.sent}"
        task = asyncio.get_running_loop().create_task(self._gift(gid, gift))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _gift(self, gid: str, gift: dict[str, Any]) -> None:
        try:
            ack = await self.client.gift(gift["id"], 1, gift_id=gid)
        except GiftRefused as exc:
            line = f"refused {gift['name']}: {exc.code}: {exc.message}"
        except ClientError as exc:
            line = f"not sent {gift['name']}: {exc}"
        else:
            self.view.balance = ack.get("balance")
            line = f"sent {gift['name']}: ack {gid} balance {ack.get('balance')}"
        self.view.feed.append(line)
        self.show(line)

    def _read_keys(self) -> Callable[[], None]:
        """Read keys from stdin: single keys on a terminal (no Enter needed), else whatever
        arrives (a pipe: each character a key). Returns the function that stops reading."""
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        mode = cbreak() if not self.plain and sys.stdin.isatty() else contextlib.nullcontext()
        mode.__enter__()

        def on_input() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if not data:  # end of input: keep watching until the room ends or q
                loop.remove_reader(fd)
                return
            for key in data.decode(errors="replace"):
                if not key.isspace():
                    self.press(key)

        try:
            loop.add_reader(fd, on_input)
        except (OSError, ValueError):  # stdin is a regular file or closed: no keys
            mode.__exit__(None, None, None)
            return lambda: None

        def stop() -> None:
            loop.remove_reader(fd)
            mode.__exit__(None, None, None)

        return stop
