"""A new user's first ten minutes, each trap a test, against real `giftstream` processes: tools
that refuse a missing data dir and say what they use, a banner whose lines work when pasted,
a busy port, a second serve on one data dir, a demo client that gives up naming the URL, and
logs with an access line per request and per socket and a shutdown summary."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, Api, ServerProc, free_port, join, run_cli, token, wait_until, wait_until_sync

pytestmark = pytest.mark.timeout(120)


def no_secret_env() -> dict[str, str]:
    """The CLI as a user runs it: the secret comes from the data dir, not $GIFTSTREAM_SECRET."""
    return {"GIFTSTREAM_SECRET": ""}


def client_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client_demo", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", [["token", "alice"], ["audit"], ["settle"], ["migrate"], ["rebuild-wallets"]])
def test_tools_refuse_a_data_dir_that_does_not_exist(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "nowhere"
    result = run_cli(*command, "--data-dir", str(missing), env=no_secret_env())
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"data dir {missing} does not exist" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists(), "a tool must not create a data dir"


def test_the_default_data_dir_is_refused_too_when_missing(tmp_path: Path) -> None:
    """`giftstream audit` run from another directory used to make ./var and pass on nothing."""
    result = subprocess.run([sys.executable, "-m", "server.cli", "audit"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**no_secret_env(), "PATH": "/usr/bin:/bin",
                                                        "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and f"data dir {tmp_path / 'var'} does not exist" in result.stderr
    assert not (tmp_path / "var").exists()


async def test_tools_say_which_data_dir_and_server_they_use(make_server: Callable[..., ServerProc],
                                                           tmp_path: Path) -> None:
    data = tmp_path / "var"
    server = make_server(data, env=no_secret_env()).start()
    valkey = json.loads((data / "valkey.json").read_text())["url"]

    minted = run_cli("token", "alice", "--name", "Alice", "--data-dir", str(data), env=no_secret_env())
    assert minted.returncode == 0, minted.stderr
    assert f"data dir {data}" in minted.stderr and "the serve running on it accepts it" in minted.stderr
    alice = minted.stdout.strip()
    async with httpx.AsyncClient(base_url=server.base) as http:  # the token works on that server
        r = await http.get("/v1/wallet", headers={"authorization": f"Bearer {alice}"})
        assert r.status_code == 200 and r.json()["user_id"] == "alice"

    audit = run_cli("audit", "--json", "--data-dir", str(data), env=no_secret_env())
    assert audit.returncode == 0, audit.stderr
    assert json.loads(audit.stdout)["ok"] is True  # stdout stays the report
    said = audit.stderr.strip().splitlines()[0]
    assert said.startswith(f"giftstream audit: data dir {data}, redis {valkey} (the valkey of the serve")
    assert f"ledger sqlite:///{data}/giftstream.sqlite3" in said

    migrate = run_cli("migrate", "--data-dir", str(data), env=no_secret_env())
    assert migrate.returncode == 0 and f"giftstream migrate: data dir {data}" in migrate.stderr


def test_a_busy_port_is_said_with_the_flag_to_change_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--no-demo", "--port", str(port), "--data-dir", str(tmp_path / "var"), timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and f"--port {port + 1}" in result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
    assert not (tmp_path / "var" / "valkey.json").exists(), "nothing is started before the port is known free"


async def test_a_second_serve_on_a_data_dir_says_it_joins_as_a_second_gateway(
        make_server: Callable[..., ServerProc], tmp_path: Path) -> None:
    data = tmp_path / "var"
    first = make_server(data).start()
    second = make_server(data).start()
    log = second.log.read_text()
    assert f"data dir {data} belongs to a running `giftstream serve` (pid {first.proc.pid})" in log  # type: ignore[union-attr]
    assert "joining that node's valkey" in log and "as a second gateway" in log
    assert "second gateway" not in first.log.read_text()
    # One system: a recharge on one is the balance on the other.
    a, b = Api(first, token("vic")), Api(second, token("vic"))
    assert (await a.recharge(coins=50)).status_code == 201
    assert (await b.wallet())["coins"] == 50
    await a.close()
    await b.close()
    second.terminate()
    assert first.running() and (data / "valkey.json").exists(), "the joiner leaves the owner's valkey running"


class Serve:
    """`giftstream serve` with its banner (ServerProc starts with --no-demo)."""

    def __init__(self, data: Path, port: int) -> None:
        self.port = port
        self.out = data.parent / f"banner-{port}.log"
        data.parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--data-dir", str(data)],
                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**_env(), "PYTHONUNBUFFERED": "1"})
        wait_until_sync(lambda: "GIFTSTREAM_VIEWER_TOKEN=" in self.text() or self.proc.poll() is not None,
                        timeout=60, message=lambda: self.text())
        assert self.proc.poll() is None, self.text()

    def text(self) -> str:
        return self.out.read_text()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(40)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "GIFTSTREAM_SECRET": ""}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path / "var", free_port())
    yield s
    if s.proc.poll() is None:
        s.stop()


def test_the_banner_lines_work_when_pasted(serve: Serve, tmp_path: Path) -> None:
    text = serve.text()
    export = next(line.strip() for line in text.splitlines() if line.strip().startswith("export "))
    assert re.fullmatch(r"export GIFTSTREAM_URL=\S+ GIFTSTREAM_HOST_TOKEN=\S+ GIFTSTREAM_VIEWER_TOKEN=\S+", export)
    env = dict(kv.split("=", 1) for kv in export.split()[1:])
    base = f"http://127.0.0.1:{serve.port}"
    assert env["GIFTSTREAM_URL"] == base
    # Browser links open the demo room directly, as the host and as the viewer.
    for role in ("HOST", "VIEWER"):
        assert f"{base}/demo?room=demo&token={env[f'GIFTSTREAM_{role}_TOKEN']}" in text
    commands = [line.split("#")[0].strip() for line in text.splitlines() if " -m client_demo " in line]
    assert commands and all(c.startswith(shlex.quote(sys.executable) + " -m client_demo ") for c in commands)
    assert all('"$GIFTSTREAM_' in c and "eyJ" not in c for c in commands), commands  # no bare tokens

    def paste(command: str) -> subprocess.CompletedProcess[str]:
        # A fresh terminal: the export line, then the command, as printed; not from the repo.
        return subprocess.run(["bash", "-c", f"{export}\n{command}"], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    recharge = paste(next(c for c in commands if " recharge " in c))
    assert recharge.returncode == 0 and "credited: 65 coins" in recharge.stdout, recharge.stdout + recharge.stderr
    gift = paste(next(c for c in commands if " gift " in c))
    assert gift.returncode == 0 and "done: 1 acked (0 replayed), 0 failed; balance 60" in gift.stdout, gift.stdout
    audit = next(line.split("#")[0].strip() for line in text.splitlines() if line.strip().endswith("# coins add up"))
    done = paste(audit)
    assert done.returncode == 0 and "audit ok" in done.stdout, done.stdout + done.stderr


async def test_logs_have_an_access_line_per_request_and_socket_and_a_shutdown_summary(serve: Serve) -> None:
    base = f"http://127.0.0.1:{serve.port}"
    viewer = token("vic")  # signed with the test secret: refused, and logged without the token
    host_token = re.search(r"GIFTSTREAM_HOST_TOKEN=(\S+)", serve.text())
    assert host_token
    async with httpx.AsyncClient(base_url=base) as http:
        assert (await http.get("/v1/catalog")).status_code == 200
        assert (await http.get("/v1/nowhere")).status_code == 404
    server = ServerProc(serve.out.parent / "var", port=serve.port)
    async with join(server, "demo", host_token.group(1)) as host:
        await host.send({"type": "ping", "id": "p"})
        await host.until(lambda: any(m.get("type") == "pong" for m in host.other))
    import websockets

    with pytest.raises(websockets.ConnectionClosed):
        async with join(server, "demo", viewer):
            pass
    await wait_until(lambda: "socket closed: room demo, user demo_host, by the peer" in serve.text())
    async with join(server, "demo", host_token.group(1)):
        assert await asyncio.to_thread(serve.stop) in (0, -signal.SIGTERM)
    log = serve.text()
    assert re.search(r'INFO uvicorn.access: 127.0.0.1:\d+ - "GET /v1/catalog HTTP/1.1" 200', log), log
    assert '"GET /v1/nowhere HTTP/1.1" 404' in log
    assert "socket refused: room demo, close 4401" in log
    assert "socket closed: room demo, user demo_host, close 1001 after" in log
    assert log.count(host_token.group(1)) == 2, "a token is printed in the banner only (link and export line)"
    # A room socket's handshake is answered by the fast door (rooms/door.py), which logs no line
    # of its own: a socket's access line is its close line above (user, close code, duration).
    assert viewer not in log
    assert re.search(r"shutdown: 1 room sockets closed with 1001 \(resume advised\), \d+ movements settled by "
                     r"this node's settler, embedded valkey stopped", log), log


def test_a_token_in_a_logged_path_is_redacted() -> None:
    from server.cli import _RedactTokens

    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
                               ("127.0.0.1:5", "/v1/rooms/demo/ws?token=eyJ.abc.def&x=1"), None)
    assert _RedactTokens().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "WebSocket /v1/rooms/demo/ws?token=<redacted>&x=1" [accepted]'


@pytest.mark.parametrize("command", [["watch", "--room", "demo"], ["gift", "--room", "demo"]])
def test_the_demo_client_names_the_url_it_cannot_reach_and_gives_up(command: list[str]) -> None:
    port = free_port()
    result = client_cli(*command, "--url", f"http://127.0.0.1:{port}", "--token", token("vic"), "--tries", "2")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"cannot connect to ws://127.0.0.1:{port}/v1/rooms/demo/ws?token=... after 2 tries" in result.stdout
    assert "Traceback" not in result.stderr


def test_http_commands_name_the_url_they_cannot_reach() -> None:
    port = free_port()
    result = client_cli("wallet", "--url", f"http://127.0.0.1:{port}", "--token", token("vic"))
    assert result.returncode == 1 and f"cannot reach http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_watch_stops_by_itself_for_scripts(server: ServerProc, api: Callable[..., Api]) -> None:
    room = await api("hana", "host").create_room()
    viewer = api("vic", name="Vic")
    assert (await viewer.recharge(coins=30)).status_code == 201

    timed = await asyncio.to_thread(client_cli, "watch", "--url", server.base, "--token", token("w"), "--room", room,
                                    "--for", "1")
    assert timed.returncode == 0 and timed.stdout.strip().endswith("stopped after 1s"), timed.stdout

    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client_demo", "watch", "--url", server.base, "--token", token("w"), "--room", room,
        "--until-gifts", "2", cwd=ROOT, stdout=subprocess.PIPE)
    try:
        async with join(server, room, viewer.token) as c:
            await wait_until(lambda: _viewers(server, room) >= 2, timeout=20)
            for i in range(2):
                await c.gift(f"w{i}")
                await c.reply(f"w{i}")
        out, _ = await asyncio.wait_for(watch.communicate(), 30)
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    assert watch.returncode == 0 and out.decode().count("Vic sent Rose x1") == 2, out


def _viewers(server: ServerProc, room: str) -> int:
    return int(httpx.get(f"{server.base}/v1/rooms/{room}", timeout=5).json()["viewers"])
