"""The server under test: one the storm starts (`giftstream serve` on a temp data dir) or one it
is pointed at, plus what it can read about it: /healthz, /proc figures, audit, the SQLite ledger.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (children, e.g. the server, inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KIB
    except (OSError, ValueError, IndexError):
        return None


def cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


class Target:
    def __init__(self, base: str, secret: str, data_dir: Path | None, redis_url: str | None,
                 server_pid: int | None, proc: subprocess.Popen[bytes] | None = None,
                 tmp: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.base = base.rstrip("/")
        u = urlparse(self.base)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.secret = secret
        self.data_dir = data_dir
        self.redis_url = redis_url
        self.server_pid = server_pid
        self.proc = proc
        self._tmp = tmp

    @classmethod
    def start(cls, secret: str, env: dict[str, str], keep: bool = False, args: list[str] | None = None) -> Target:
        tmp = None if keep else tempfile.TemporaryDirectory(prefix="giftstream-storm-")
        data_dir = Path(tmp.name if tmp else tempfile.mkdtemp(prefix="giftstream-storm-"))
        port = free_port()
        log = open(data_dir / "serve.log", "ab")
        cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(port),
               "--data-dir", str(data_dir), *(args or [])]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "GIFTSTREAM_SECRET": secret, **env})
        t = cls(f"http://127.0.0.1:{port}", secret, data_dir, None, proc.pid, proc, tmp)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"giftstream serve exited {proc.returncode}: {t.log_tail()}")
            try:
                if httpx.get(t.base + "/healthz", timeout=2).status_code == 200:
                    return t
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                t.stop()
                raise RuntimeError(f"giftstream serve did not become healthy: {t.log_tail()}")
            time.sleep(0.1)

    def log_tail(self) -> str:
        if self.data_dir is None:
            return ""
        path = self.data_dir / "serve.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def valkey_pid(self) -> int | None:
        if self.data_dir is None:
            return None
        try:
            return int(json.loads((self.data_dir / "valkey.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
        return self.proc.returncode

    # checks ----------------------------------------------------------------------------------

    def audit(self) -> tuple[int, dict[str, Any] | None, str]:
        """`giftstream audit --json` against this server's data dir (and Redis)."""
        if self.data_dir is None:
            return -1, None, "no --data-dir for the target: audit skipped"
        cmd = [sys.executable, "-m", "server.cli", "audit", "--json", "--data-dir", str(self.data_dir)]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "GIFTSTREAM_SECRET": self.secret})
        try:
            return r.returncode, json.loads(r.stdout), r.stderr[-2000:]
        except ValueError:
            return r.returncode, None, (r.stdout + r.stderr)[-2000:]

    def settled_gifts(self, rooms: list[str]) -> tuple[dict[str, tuple[str, str]], int] | None:
        """gift_id -> (client_id, sender) of settled gifts in these rooms, and (sender, client id)
        pairs settled more than once (a double charge), from the SQLite ledger in the data dir."""
        if self.data_dir is None:
            return None
        path = self.data_dir / "giftstream.sqlite3"
        if not path.exists():
            return None
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            out: dict[str, tuple[str, str]] = {}
            doubles = 0
            for i in range(0, len(rooms), 500):
                chunk = rooms[i : i + 500]
                marks = ",".join("?" * len(chunk))
                for gid, cid, sender in db.execute(
                        f"SELECT id, client_id, sender_id FROM gifts WHERE room_id IN ({marks})", chunk):
                    out[gid] = (cid, sender)
                doubles += db.execute(
                    f"SELECT COUNT(*) FROM (SELECT 1 FROM gifts WHERE room_id IN ({marks}) "
                    "GROUP BY sender_id, client_id HAVING COUNT(*) > 1)", chunk).fetchone()[0]
            return out, doubles
        finally:
            db.close()
