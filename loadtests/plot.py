"""Plots for docs/benchmarks.md from storm reports (needs matplotlib, the `load` extra).

    python -m loadtests.plot timeline REPORT.json OUT.png [--title T]
    python -m loadtests.plot roomsize OUT.png REPORT.json [REPORT.json ...]
    python -m loadtests.plot sweep OUT.png REPORT.json [REPORT.json ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _load(path: str) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()))


def timeline(report: dict[str, Any], out: str, title: str) -> None:
    """Per second: acks and deliveries, ack/delivery p50/p99, settlement lag, server CPU."""
    s = report["series"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    acks = s["acks"]
    dels = s["deliveries"]
    ax1.plot([a["t"] for a in acks], [a["acks"] for a in acks], label="acks/s", color="tab:blue")
    ax1.set_ylabel("acks / s", color="tab:blue")
    if any(d["deliveries"] for d in dels):
        ax1b = ax1.twinx()
        ax1b.plot([d["t"] for d in dels], [d["deliveries"] for d in dels], label="deliveries/s", color="tab:green")
        ax1b.set_ylabel("deliveries / s", color="tab:green")
    ax1.set_title(title)
    ax2.plot([a["t"] for a in acks], [a["p99_ms"] for a in acks], label="ack p99", color="tab:blue")
    ax2.plot([a["t"] for a in acks], [a["p50_ms"] for a in acks], label="ack p50", color="tab:blue", ls=":")
    pts = [d for d in dels if d["p99_ms"] is not None]
    if pts:
        ax2.plot([d["t"] for d in pts], [d["p99_ms"] for d in pts], label="delivery p99", color="tab:green")
        ax2.plot([d["t"] for d in pts], [d["p50_ms"] for d in pts], label="delivery p50", color="tab:green", ls=":")
    ax2.set_ylabel("latency (ms)")
    ax2.set_yscale("log")
    ax2.legend(loc="upper left", fontsize=8)
    samples = [x for x in s["samples"] if x.get("outbox_lag_ms") is not None]
    ax3.plot([x["t"] for x in samples], [x["outbox_lag_ms"] for x in samples], label="settlement lag (ms)",
             color="tab:red")
    ax3.set_ylabel("settlement lag (ms)", color="tab:red")
    ax3b = ax3.twinx()
    for key, color in (("cpu_server", "black"), ("cpu_valkey", "tab:purple"), ("cpu_worker0", "tab:orange"),
                       ("cpu_settler", "tab:brown")):
        pts2 = [x for x in s["samples"] if key in x]
        if pts2:
            ax3b.plot([x["t"] for x in pts2], [x[key] for x in pts2], label=key.replace("cpu_", "CPU % "),
                      color=color, lw=0.8)
    ax3b.set_ylabel("CPU %")
    ax3b.legend(loc="upper right", fontsize=8)
    ax3.set_xlabel("seconds since the storm started")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def roomsize(reports: list[dict[str, Any]], out: str) -> None:
    """Event deliveries/s against viewers in the room, with the bare ceilings where measured."""
    rows = sorted(reports, key=lambda r: r["config"]["viewers_per_room"])
    x = [r["config"]["viewers_per_room"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, [r["deliveries_per_s"] for r in rows], "o-", label="giftstream deliveries/s")
    ax1.plot(x, [r["config"]["rate"] * (v + r["config"]["gifters"] / max(1, r["config"]["rooms"]))
                 for r, v in zip(rows, x, strict=True)], "k:", label="offered (rate x sockets)")
    cx = [(r["config"]["viewers_per_room"], r["ceilings"]) for r in rows if r.get("ceilings")]
    if cx:
        ax1.plot([c[0] for c in cx], [c[1]["broadcast_coalesced_per_s"] for c in cx], "s--",
                 label="bare websockets, coalesced 20 ms")
        ax1.plot([c[0] for c in cx], [c[1]["broadcast_one_frame_per_s"] for c in cx], "^--",
                 label="bare websockets, frame per event")
    ax1.set_xlabel("viewers in the room")
    ax1.set_ylabel("event deliveries / s")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    ax1.set_title(f"one room, {rows[0]['config']['rate']:g} gifts/s")
    ax2.plot(x, [r["delivery_p99_ms"] for r in rows], "o-", label="delivery p99 (from sender's ack)")
    ax2.plot(x, [r["deliveries"]["vs_ack"]["p50_ms"] for r in rows], "o:", label="delivery p50")
    ax2.plot(x, [r["ack_p99_ms"] for r in rows], "s-", label="ack p99")
    ax2.set_xlabel("viewers in the room")
    ax2.set_ylabel("ms")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def sweep(reports: list[dict[str, Any]], out: str) -> None:
    """Gift acks: achieved rate and ack latency against the offered rate."""
    rows = sorted(reports, key=lambda r: r["config"]["rate"])
    x = [r["config"]["rate"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(x, [r["acks_per_s"] for r in rows], "o-", label="acks/s achieved")
    ax1.plot(x, x, "k:", label="offered")
    ax1.set_xlabel("offered gifts / s")
    ax1.set_ylabel("acks / s")
    ax1.legend(fontsize=8)
    for q, style in (("p50_ms", "o:"), ("p95_ms", "o--"), ("p99_ms", "o-")):
        ax2.plot(x, [r["acks"][q] for r in rows], style, label=f"ack {q[:-3]}")
    ax2.axhline(50, color="red", lw=0.8, label="target p99 50 ms")
    ax2.set_yscale("log")
    ax2.set_xlabel("offered gifts / s")
    ax2.set_ylabel("ms")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.plot")
    sub = p.add_subparsers(dest="kind", required=True)
    t = sub.add_parser("timeline")
    t.add_argument("report")
    t.add_argument("out")
    t.add_argument("--title", default="")
    for kind in ("roomsize", "sweep"):
        r = sub.add_parser(kind)
        r.add_argument("out")
        r.add_argument("reports", nargs="+")
    args = p.parse_args(argv)
    if args.kind == "timeline":
        timeline(_load(args.report), args.out, args.title or args.report)
    elif args.kind == "roomsize":
        roomsize([_load(x) for x in args.reports], args.out)
    else:
        sweep([_load(x) for x in args.reports], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
