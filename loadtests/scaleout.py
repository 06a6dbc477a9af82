"""Scale-out: the same gift storm through 1 gateway on one valkey and through 2 gateways on a
3-primary cluster, as a ramp of offered rates, with each process's CPU per acknowledged gift.

    ulimit -n 20000
    flock /tmp/giftstream-bench.lock python -m loadtests.scaleout --report scaleout.json

Setups (`--setups`, both by default):
- `single`: `giftstream serve` with its embedded valkey (AOF `appendfsync always`) and
  `giftstream settle` beside it, SQLite ledger in the data dir.
- `cluster`: a `dev-cluster` of `--primaries` primaries and no replicas (so no `WAIT`: the
  throughput figure, not the durable one), `--gateways` `giftstream serve` processes on it (the
  first one's data dir holds the SQLite ledger, the others point `--database-url` at it), one
  `giftstream settle`. The storm's client workers are spread over the gateways.

Each step is one full `loadtests.storm` run (`--rooms` rooms, one gifter each, no viewers,
`--step-s` seconds of gifting at the offered rate) with its verdict: every acked gift settled
once, `giftstream audit` ok, every socket got every event of its room once. A setup's ramp stops
after its last rate, or after two steps in a row far past the bound (ack p99 over 4x
`--p99-bound-ms`, or fewer than 90% of the offered gifts acked in the window). With
`--quiet-wait-s`, each step first waits (that long at most) for the machine to be quiet.

CPU is each process's utime + stime from /proc/<pid>/stat, read every 0.2 s by a thread of this
process, interpolated at the edges of the gifting window, divided by the gifts acked in it:
gateway(s), each valkey, the settler, and the load generator (the storm's workers and this
process). The headline per setup is the highest offered rate whose ack p99 stayed under the
bound with the verdict ok. 127.0.0.1 only; every step and the whole run are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtests import storm as st
from loadtests.target import NO_IDLE_END, ROOT, Target, cpu_seconds, free_port, raise_fd_limit

# A storm, not a person: the per-socket gift rate limit out of the way (loadtests.faults.FAST).
FAST = {"GIFTSTREAM_GIFT_RATE_PER_S": "100000", "GIFTSTREAM_GIFT_BURST": "100000"}
SAMPLE_S = 0.2
# The whole machine's busy CPU, beside our processes': the rest is other work sharing the cores.
MACHINE = "_machine"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.scaleout", description=__doc__.split("\n")[0])
    p.add_argument("--setups", default="single,cluster", help="comma-separated: single, cluster")
    p.add_argument("--rates", default="3000,4500,6000,7500", help="offered gifts/s, one storm step each")
    p.add_argument("--step-s", type=float, default=15.0, help="seconds of gifting per step")
    p.add_argument("--rooms", type=int, default=500, help="rooms, one gifter each, no viewers")
    p.add_argument("--processes", type=int, default=2, help="storm client workers (spread over the gateways)")
    p.add_argument("--primaries", type=int, default=3)
    p.add_argument("--gateways", type=int, default=2, help="gateways on the cluster")
    p.add_argument("--p99-bound-ms", type=float, default=50.0)
    p.add_argument("--quiet-below", type=float, default=0.5,
                   help="before each step, wait until the machine's busy cores (all processes, over 2 s) are "
                        "under this ...")
    p.add_argument("--quiet-wait-s", type=float, default=0.0,
                   help="... for at most this long (0: do not wait); the step runs either way")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(f"[scaleout {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# CPU accounting ------------------------------------------------------------------------------

Series = dict[str, list[tuple[float, float]]]


def cpu_at(samples: list[tuple[float, float]], at: float) -> float:
    """A process's cumulative CPU seconds at `at`, linear between the samples around it (the
    first or last sample outside them)."""
    if not samples:
        return 0.0
    if at <= samples[0][0]:
        return samples[0][1]
    for (t1, c1), (t2, c2) in itertools.pairwise(samples):
        if at <= t2:
            return c1 + (c2 - c1) * (at - t1) / (t2 - t1) if t2 > t1 else c2
    return samples[-1][1]


def group_of(label: str) -> str:
    """`generator:<pid>` -> `generator`: the storm's workers and this process count as one load
    generator; every other label (a gateway, a valkey by port, the settler) stands alone."""
    return label.split(":", 1)[0] if label.startswith("generator:") else label


def window_cpu(series: Series, start: float, end: float) -> dict[str, float]:
    """CPU seconds each process group spent between start and end."""
    out: dict[str, float] = {}
    for label, samples in series.items():
        spent = cpu_at(samples, end) - cpu_at(samples, start)
        out[group_of(label)] = out.get(group_of(label), 0.0) + max(0.0, spent)
    return out


def per_gift_us(cpu_s: dict[str, float], acked: int) -> dict[str, float]:
    """Microseconds of CPU per acked gift, per group and in total (the machine's own figure left
    out)."""
    if acked <= 0:
        return {}
    ours = {k: v for k, v in sorted(cpu_s.items()) if k != MACHINE}
    out = {k: round(v / acked * 1e6, 1) for k, v in ours.items()}
    out["total"] = round(sum(ours.values()) / acked * 1e6, 1)
    return out


def machine_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine has been busy (not idle, not waiting on I/O)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def marginal_fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares over (acked gifts/s, cores busy) of a process's steps: the CPU one more gift
    a second costs it (us) and what it burns at no gifts (cores: loops, ticks, the settler's
    polls), which per-gift averages at low rates fold in."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return {"us_per_gift": round(slope * 1e6, 1), "cores_at_zero": round(my - slope * mx, 3)}


def fits(rows: list[dict[str, Any]], step_s: float) -> dict[str, dict[str, float] | None]:
    """marginal_fit per process over a setup's steps whose verdict was ok."""
    ok = [r for r in rows if r["verdict"] == "ok"]
    names = sorted({k for r in ok for k in r["cpu_s"] if k != MACHINE})
    return {k: marginal_fit([(r["acked_per_s"], r["cpu_s"].get(k, 0.0) / step_s) for r in ok]) for k in names}


def children_of(ppid: int) -> list[int]:
    """Pids whose parent is ppid (the storm's worker processes are this process's children)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append(int(entry))
    return out


class CpuClock:
    """A thread reading the cumulative CPU of named processes, and of this process's children
    not named (the load generator), every SAMPLE_S."""

    def __init__(self, named: dict[str, int]) -> None:
        self.named = named
        self.series: Series = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-clock", daemon=True)

    def __enter__(self) -> CpuClock:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def _sample(self) -> None:
        me = os.getpid()
        named = set(self.named.values())
        pids = {**self.named, f"generator:{me}": me}
        for pid in children_of(me):
            if pid not in named:
                pids[f"generator:{pid}"] = pid
        now = time.time()
        for label, pid in pids.items():
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self.series.setdefault(label, []).append((now, cpu))
        busy = machine_cpu_seconds()
        if busy is not None:
            self.series.setdefault(MACHINE, []).append((now, busy))


def wait_quiet(below: float, wait_s: float) -> float | None:
    """Until the whole machine's busy cores over 2 s are under `below` (other work sharing the
    cores would be measured with ours), for at most wait_s; returns the last reading."""
    deadline = time.monotonic() + wait_s
    busy = None
    while True:
        a = machine_cpu_seconds()
        time.sleep(2.0)
        b = machine_cpu_seconds()
        if a is None or b is None:
            return None
        busy = round((b - a) / 2.0, 2)
        if busy < below or time.monotonic() >= deadline:
            return busy


# the setups ----------------------------------------------------------------------------------

def _wait_healthy(base: str, proc: subprocess.Popen[bytes], logfile: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode}: {logfile.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{base} did not become healthy: {logfile.read_text()[-3000:]}")


class ClusterTarget(Target):
    """Gateways on a dev cluster, one settler; the storm sees the first gateway (HTTP, /healthz,
    the SQLite ledger in its data dir) and spreads its workers over all of them."""

    def __init__(self, secret: str, primaries: int, gateways: int) -> None:
        from server import devcluster

        self.root = Path(tempfile.mkdtemp(prefix="giftstream-scaleout-"))
        self.cluster = devcluster.start(self.root / "cluster", primaries=primaries, replicas=0)
        self.ports = devcluster.primary_ports(self.cluster)
        self.env = {**os.environ, "GIFTSTREAM_SECRET": secret, **NO_IDLE_END, **FAST}
        self.gateway_procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[tuple[str, int]] = []
        first = self.root / "gw1"
        ledger = f"sqlite:///{first / 'giftstream.sqlite3'}"
        try:
            for i in range(gateways):
                data_dir = self.root / f"gw{i + 1}"
                data_dir.mkdir()
                port = free_port()
                cmd = [sys.executable, "-m", "server.cli", "serve", "--no-demo", "--no-settler", "--port", str(port),
                       "--data-dir", str(data_dir), "--redis-url", self.cluster.url]
                if i:
                    cmd += ["--database-url", ledger]
                logfile = data_dir / "serve.log"
                with open(logfile, "ab") as out:
                    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env)
                self.gateway_procs.append(proc)
                self.addresses.append(("127.0.0.1", port))
                # One at a time: the first one migrates the ledger the others share.
                _wait_healthy(f"http://127.0.0.1:{port}", proc, logfile)
        except BaseException:
            self._teardown()
            raise
        host, port = self.addresses[0]
        super().__init__(f"http://{host}:{port}", secret, first, self.cluster.url, self.gateway_procs[0].pid,
                         self.gateway_procs[0])
        with open(first / "settle.log", "ab") as out:
            self.settler = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "settle", "--data-dir", str(first), "--redis-url",
                 self.cluster.url], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def ws_address(self, worker: int) -> tuple[str, int]:
        return self.addresses[worker % len(self.addresses)]

    def named_pids(self) -> dict[str, int]:
        pids = {f"gateway{i + 1}": p.pid for i, p in enumerate(self.gateway_procs)}
        pids.update({f"valkey:{n.port}": n.pid for n in self.cluster.nodes if n.pid})
        if self.settler is not None:
            pids["settler"] = self.settler.pid
        return pids

    def valkey_pid(self) -> int | None:
        return None  # several: CpuClock reads each

    def _node_clients(self) -> list[Any]:
        return [n.client() for n in self.cluster.nodes]

    def valkey_watch(self) -> None:
        import redis

        for c in self._node_clients():
            try:
                c.config_resetstat()
            except redis.RedisError:
                pass

    def valkey_figures(self) -> dict[str, Any]:
        """Each node's CPU and its commands' cost since the step's start."""
        import redis

        out: dict[str, Any] = {}
        for n in self.cluster.nodes:
            try:
                c = n.client()
                stats = c.info("commandstats")
                out[str(n.port)] = {
                    "calls": sum(v["calls"] for v in stats.values()),
                    "top_commands": {k.removeprefix("cmdstat_"): {"calls": v["calls"],
                                                                  "usec_per_call": v["usec_per_call"]}
                                     for k, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:4]}}
            except redis.RedisError as exc:
                out[str(n.port)] = {"error": type(exc).__name__}
        return out

    def partitions_per_primary(self, partitions: int = 16) -> dict[str, int]:
        """How the user partitions' slots fall on the primaries (16 over 3 cannot be even)."""
        from server import devcluster
        from server.cluster import slot_of
        from server.keys import gift_ids_key

        owners = devcluster.slot_owners(self.cluster.nodes[0])
        out = {str(port): 0 for port in self.ports}
        for k in range(partitions):
            slot = slot_of(gift_ids_key(k))
            port = next(p for first, last, p in owners if first <= slot <= last)
            out[str(port)] += 1
        return out

    def _teardown(self, first_too: bool = True) -> None:
        for proc in self.gateway_procs[0 if first_too else 1:]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        self.cluster.stop()

    def stop(self) -> int | None:
        code = super().stop()  # the settler and the first gateway
        self._teardown(first_too=False)
        shutil.rmtree(self.root, ignore_errors=True)
        return code


def start_single(secret: str) -> tuple[Target, dict[str, int]]:
    t = Target.start(secret, {**FAST}, separate_settler=True)
    pids = {"gateway1": t.server_pid or 0, "settler": t.settler_pid() or 0}
    vpid = t.valkey_pid()
    if vpid:
        pids["valkey"] = vpid
    return t, {k: v for k, v in pids.items() if v}


# the ramp ------------------------------------------------------------------------------------

def step_args(args: argparse.Namespace, rate: float) -> argparse.Namespace:
    return st.parse_args(["--rooms", str(args.rooms), "--viewers-per-room", "0", "--gifters", str(args.rooms),
                          "--rate", str(rate), "--duration", str(args.step_s), "--processes", str(args.processes),
                          "--settle-timeout", "60", "--quiet"])


def step_row(rate: float, report: dict[str, Any], cpu_s: dict[str, float], step_s: float) -> dict[str, Any]:
    acked = int(report["acks"]["in_window"])
    ours = sum(v for k, v in cpu_s.items() if k != MACHINE)
    return {
        "offered_per_s": rate,
        "acked_per_s": report["acks_per_s"],
        "ack_p50_ms": report["acks"]["p50_ms"],
        "ack_p99_ms": report["acks"]["p99_ms"],
        "verdict": report["verdict"],
        "failures": report["failures"],
        "started_at": report["started_at"],
        "acked_in_window": acked,
        "cpu_s": {k: round(v, 3) for k, v in sorted(cpu_s.items())},
        "cpu_us_per_gift": per_gift_us(cpu_s, acked),
        # Cores the run's own processes kept busy, and everything else on the machine meanwhile.
        "cores_ours": round(ours / step_s, 2),
        "cores_others": round(max(0.0, cpu_s.get(MACHINE, ours) - ours) / step_s, 2),
        "settle_lag_p99_ms": report["settle_lag_p99_ms"],
        "client_loop_lag_max_ms": report["gifts"].get("client_loop_lag_max_ms"),
        "retries": report["gifts"]["attempts"] - report["gifts"]["sent"],
        "errors": report["gifts"]["errors"],
        "audit_ok": report["audit"]["ok"],
        "settlement": {k: report["settlement"].get(k) for k in ("drained", "checked", "settled_rows", "missing",
                                                                "client_mismatch", "double_charged")},
        "valkey": report.get("valkey"),
    }


def headline(rows: list[dict[str, Any]], bound_ms: float) -> dict[str, Any] | None:
    """The highest offered rate whose ack p99 stayed under the bound with the verdict ok."""
    good = [r for r in rows if r["verdict"] == "ok" and r["ack_p99_ms"] is not None and r["ack_p99_ms"] < bound_ms]
    if not good:
        return None
    best = max(good, key=lambda r: r["offered_per_s"])
    return {k: best[k] for k in ("offered_per_s", "acked_per_s", "ack_p50_ms", "ack_p99_ms", "cpu_us_per_gift")}


def too_far(row: dict[str, Any], bound_ms: float) -> bool:
    p99 = row["ack_p99_ms"]
    return (p99 is None or p99 > 4 * bound_ms) or row["acked_per_s"] < 0.9 * row["offered_per_s"]


def ramp(args: argparse.Namespace, setup: str, secret: str) -> dict[str, Any]:
    started = time.time()
    if setup == "single":
        t, named = start_single(secret)
        extra: dict[str, Any] = {"gateways": 1, "valkeys": 1}
    else:
        ct = ClusterTarget(secret, args.primaries, args.gateways)
        t, named = ct, ct.named_pids()
        extra = {"gateways": args.gateways, "primaries": args.primaries, "replicas": 0,
                 "partitions_per_primary": ct.partitions_per_primary()}
    log(args, f"{setup}: {named}")
    rows: list[dict[str, Any]] = []
    try:
        for rate in [float(r) for r in args.rates.split(",")]:
            busy = wait_quiet(args.quiet_below, args.quiet_wait_s) if args.quiet_wait_s > 0 else None
            log(args, f"{setup}: {rate:g} gifts/s for {args.step_s:g} s (machine busy before: {busy} cores)")
            with CpuClock(named) as clock:
                report = asyncio.run(st.storm(step_args(args, rate), t))
            t0 = float(report["t0"])
            row = step_row(rate, report, window_cpu(clock.series, t0, t0 + args.step_s), args.step_s)
            row["cores_busy_before"] = busy
            rows.append(row)
            log(args, f"{setup}: {rate:g}/s offered -> {row['acked_per_s']:g}/s acked, p50 {row['ack_p50_ms']} "
                      f"p99 {row['ack_p99_ms']} ms, verdict {row['verdict']}, us/gift {row['cpu_us_per_gift']}")
            # Two steps in a row, so one step disturbed by other work does not end the ramp.
            if len(rows) >= 2 and all(too_far(r, args.p99_bound_ms) for r in rows[-2:]):
                log(args, f"{setup}: past the bound twice; ramp stops")
                break
    finally:
        t.stop()
    return {"setup": setup, **extra, "processes": named, "rows": rows,
            "headline": headline(rows, args.p99_bound_ms), "marginal": fits(rows, args.step_s),
            "seconds": round(time.time() - started, 1)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| setup | offered/s | acked/s | ack p50 / p99 ms | verdict | CPU us per gift | cores: ours / others |",
             "|" + " --- |" * 7]
    for res in results:
        for r in res["rows"]:
            cpu = ", ".join(f"{k} {v:g}" for k, v in r["cpu_us_per_gift"].items())
            lines.append(f"| {res['setup']} | {r['offered_per_s']:,.0f} | {r['acked_per_s']:,.1f} | "
                         f"{r['ack_p50_ms']} / {r['ack_p99_ms']} | {r['verdict']} | {cpu} | "
                         f"{r['cores_ours']} / {r['cores_others']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    secret = secrets.token_urlsafe(24)
    results = []
    for setup in args.setups.split(","):
        if setup not in ("single", "cluster"):
            raise SystemExit(f"unknown setup {setup!r}")
        results.append(ramp(args, setup, secret))
    out = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "server_code": st.code_version(),
           "cores": os.cpu_count(), "config": vars(args), "ledger": "SQLite (WAL) in the first gateway's data dir",
           "results": results}
    if args.report:
        Path(args.report).write_text(json.dumps(out, indent=1, default=str))
    print(table(results))
    print(json.dumps({r["setup"]: {"headline": r["headline"], "marginal": r["marginal"]} for r in results}, indent=1))
    ok = all(row["verdict"] == "ok" for r in results for row in r["rows"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
