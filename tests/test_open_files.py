"""`serve` lifts its open-files limit and says how many sockets it can hold."""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

from server.cli import FILES_RESERVED, socket_capacity
from tests.support import ROOT, ServerProc, wait_until_sync


@contextmanager
def soft_open_files(limit: int) -> Iterator[int]:
    """This process's soft limit lowered to `limit` (children inherit it); the hard one is returned."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
            "from server.cli import raise_open_files\n"
            "print(raise_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[1])\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    raised, hard = out.stdout.split()
    assert raised == hard


def test_capacity_counts_every_worker() -> None:
    line = socket_capacity(20_000, 7)
    per = 20_000 - FILES_RESERVED
    assert f"up to {per:,} sockets per process" in line
    assert f"{per * 7:,} in all (7 workers" in line


def test_serve_says_how_many_sockets_it_can_hold(make_server: Callable[..., ServerProc], redis_url: str) -> None:
    with soft_open_files(1024) as hard:
        server = make_server(redis_url=redis_url).start()
    wait_until_sync(lambda: "sockets per process" in server.log.read_text(), timeout=10)
    line = next(x for x in server.log.read_text().splitlines() if "sockets per process" in x)
    assert f"open files limit {hard} per process" in line
    per = int(re.search(r"up to ([\d,]+) sockets", line).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert per == hard - FILES_RESERVED


def test_a_process_out_of_files_refuses_with_503_and_keeps_serving(make_server: Callable[..., ServerProc],
                                                                 redis_url: str) -> None:
    # serve lifts its limit to the hard one; all but 200 reserved: a connection given a
    # descriptor of 200 or more is refused.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    server = make_server(redis_url=redis_url, env={"GIFTSTREAM_FILES_RESERVED": str(hard - 200)}).start()
    held: list[socket.socket] = []
    answers: list[bytes] = []
    try:
        for _ in range(260):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            held.append(s)
        for s in held[-20:]:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answers.append(s.recv(200))
    finally:
        for s in held:
            s.close()
    assert all(a.startswith(b"HTTP/1.1 503") for a in answers), answers[:3]
    assert b'"code":"unavailable"' in answers[0] or b"unavailable" in answers[0]
    assert httpx.get(server.base + "/healthz", timeout=10).status_code == 200  # files back: served again
