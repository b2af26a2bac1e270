"""Plots for benchmark/run: `python plot.py results/summary.json results/`.

Needs matplotlib (benchmark/run installs it into benchmark/.venv). Prints the PNG file names
it wrote, one per line.
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def traffic_plot(records, scenario, outdir, fname, title):
    recs = [r for r in records if r["scenario"] == scenario and (r.get("result") or {}).get("steps")]
    if not recs:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    slo = None
    for i, r in enumerate(recs):
        steps = r["result"]["steps"]
        slo = r["result"]["params"].get("slo_ms", 50)
        x = [s["offered_rate"] for s in steps]
        c = colors[i % len(colors)]
        for q, style, name in (("p50", ":", "p50"), ("p95", "-.", "p95"), ("p99", "-", "p99"),
                               ("p999", "--", "p99.9")):
            if any(q not in s["latency_ms"] for s in steps):
                continue  # results written before loadgen reported it
            ax.plot(x, [max(s["latency_ms"][q], 0.001) for s in steps], style, color=c, marker="o",
                    markersize=3, label=f"{r['target']} {name}")
        # Steps where the generator says it was the limit are marked with an x.
        bx = [s["offered_rate"] for s in steps if s["generator"]["bottleneck"]]
        by = [s["latency_ms"]["p99"] for s in steps if s["generator"]["bottleneck"]]
        if bx:
            ax.plot(bx, by, "x", color=c, markersize=9)
        ax2.plot(x, [s["deliveries_per_sec"] / 1e6 for s in steps], "-o", color=c, label=r["target"])
    if slo:
        ax.axhline(slo, color="grey", linewidth=0.8)
        ax.text(ax.get_xlim()[0], slo * 1.08, f"{slo:g} ms", color="grey", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("offered messages / s")
    ax.set_ylabel("latency from intended send time (ms)")
    ax.set_title(f"{title}: latency (x = loadgen-bound step)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax2.set_xlabel("offered messages / s")
    ax2.set_ylabel("deliveries / s (millions)")
    ax2.set_title(f"{title}: delivered")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, fname), dpi=110)
    plt.close(fig)
    return fname


def memory_plot(records, outdir):
    recs = [r for r in records if r["scenario"] == "idle" and (r.get("result") or {}).get("levels")]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in recs:
        res = r["result"]
        pts = [(0, res.get("baseline_rss_kb"))] + [(lv["open"], lv.get("server_rss_kb")) for lv in res["levels"]]
        pts = [(x, y / 1024) for x, y in pts if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", label=r["target"])
    ax.set_xlabel("open idle connections")
    ax.set_ylabel("server RSS (MiB)")
    ax.set_title("Server memory vs connections")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "memory_vs_connections.png"), dpi=110)
    plt.close(fig)
    return "memory_vs_connections.png"


def main():
    with open(sys.argv[1]) as f:
        records = json.load(f)["records"]
    outdir = sys.argv[2]
    for name in (
        traffic_plot(records, "fanout", outdir, "fanout_latency_vs_rate.png", "Fan-out"),
        traffic_plot(records, "rooms", outdir, "rooms_latency_vs_rate.png", "Many rooms"),
        memory_plot(records, outdir),
    ):
        if name:
            print(name)


if __name__ == "__main__":
    main()
