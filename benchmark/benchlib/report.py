"""results.md for the scenarios: the tables, the environment, the plots."""

import os
import subprocess
import sys

from .common import BENCH, VENV_PY, env_lines, fmt, log

def traffic_table(rec):
    res = rec.get("result") or {}
    rows = ["| offered msg/s | deliveries/s | p50 ms | p90 ms | p95 ms | p99 ms | p99.9 ms | max ms | late/lost | gaps/dups | server CPU | CPU s / M deliveries | loadgen CPU | notes |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in res.get("steps", []):
        lat, g, srv = s["latency_ms"], s["generator"], s.get("server") or {}
        notes = []
        if g.get("bottleneck"):
            notes.append("loadgen-bound: " + "; ".join(g.get("warnings", [])))
        if s.get("noise"):
            notes.append("noise: " + "; ".join(s["noise"]))
        if s.get("closed"):
            notes.append(f"{s['closed']} closed by server {s.get('close_codes')}")
        if s.get("errors"):
            notes.append(f"errors {s['errors']}")
        rd = s.get("redis") or {}
        if rd:
            notes.append(f"Redis CPU {fmt(100 * rd.get('cpu_frac_of_core', 0), 0)}%, "
                         f"{fmt(rd.get('cpu_s_per_million_deliveries'), 2)} s / M deliveries, "
                         f"{fmt(rd.get('commands_per_message'), 2)} commands / message")
        threads = srv.get("threads") or {}
        if len(threads) > 1:
            notes.append("server threads (CPU s / run-queue wait s): " + ", ".join(
                f"{n} {t['cpu_s']:.2f}/{t['runq_wait_s']:.2f}" for n, t in sorted(threads.items())))
        rows.append(
            f"| {fmt(s['offered_rate'], 0)} | {fmt(s['deliveries_per_sec'], 0)} | {fmt(lat['p50'], 2)} | "
            f"{fmt(lat.get('p90'), 2)} | {fmt(lat.get('p95'), 2)} | {fmt(lat['p99'], 2)} | {fmt(lat['p999'], 2)} | {fmt(lat['max'], 2)} | {fmt(s.get('late', 0), 0)}/{fmt(s['lost'], 0)} | "
            f"{s['gaps']}/{s['duplicates']} | {fmt(100 * srv['cpu_frac_of_core'], 0) + '%' if srv else '-'} | "
            f"{fmt(srv.get('cpu_s_per_million_deliveries'), 2)} | "
            f"{fmt(100 * g['cpu_frac_of_core_while_sending'], 0)}% | {' '.join(notes)} |")
    best = res.get("best_rate_under_slo")
    slo = (res.get("params") or {}).get("slo_ms", 50)
    stop = f"\n\nSweep stopped early: {res['stopped_early']}." if res.get("stopped_early") else ""
    if best:
        line = (f"Highest offered rate with p99 < {slo:g} ms and no loss: **{fmt(best['offered_rate'], 0)} msg/s** "
                f"({fmt(best['deliveries_per_sec'], 0)} deliveries/s, p99 {best['p99_ms']:.2f} ms)")
        if best.get("generator_bottleneck"):
            line += " — the generator flagged itself at that step"
    else:
        line = f"No step met p99 < {slo:g} ms without loss."
    for s in res.get("steps", []):
        j = s.get("joins")
        if j:
            jl = j.get("latency_ms") or {}
            line += (f"\n\nJoins at {fmt(s['offered_rate'], 0)} msg/s: {j['sent']} sent, {j['answered']} answered, "
                     f"{j['errors']} refused, {j['skipped']} skipped; join → history p50 {fmt(jl.get('p50'), 2)} ms, "
                     f"p95 {fmt(jl.get('p95'), 2)} ms, p99 {fmt(jl.get('p99'), 2)} ms, max {fmt(jl.get('max'), 2)} ms.")
    setup = res.get("setup") or {}
    if setup.get("connects_per_sec"):
        line += (f"\n\nSetup: {fmt(setup.get('ready'), 0)} connections ready in {setup.get('setup_s', 0):.2f} s "
                 f"({fmt(setup['connects_per_sec'], 0)} connects/s, connect + upgrade + join).")
    return "\n".join(rows) + "\n\n" + line + stop + "\n"


def idle_table(rec):
    res = rec.get("result") or {}
    rows = ["| connections | open | server RSS MiB | bytes / connection | connects/s |", "|---:|---:|---:|---:|---:|"]
    base = res.get("baseline_rss_kb")
    rows.append(f"| 0 | 0 | {fmt(base / 1024 if base else None, 1)} | - | - |")
    for lv in res.get("levels", []):
        rss = lv.get("server_rss_kb")
        rows.append(f"| {fmt(lv['conns'], 0)} | {fmt(lv['open'], 0)} | {fmt(rss / 1024 if rss else None, 1)} | "
                    f"{fmt(lv.get('bytes_per_conn'), 0)} | {fmt(lv.get('connects_per_sec'), 0)} |")
    hold = res.get("hold", {})
    return "\n".join(rows) + (f"\n\nHeld {hold.get('seconds', 0):.1f} s: {hold.get('closed_during_hold', 0)} closed, "
                              f"RSS after {fmt((hold.get('server_rss_kb_after') or 0) / 1024, 1)} MiB, "
                              f"peak (VmHWM) {fmt((hold.get('server_hwm_kb') or 0) / 1024, 1)} MiB.\n")


def storm_row(rec):
    r = rec.get("result") or {}
    if not r.get("handshake_ms"):
        return f"| {rec['target']} | - | - | - | - | - | - | - | - | failed |"
    h, w = r["handshake_ms"], r["welcome_ms"]
    srv = r.get("server") or {}
    return (f"| {rec['target']} | {fmt(r['completed'], 0)}/{fmt(r['attempted'], 0)} | {fmt(r['handshakes_per_sec'], 0)} | "
            f"{h['p50']:.2f} | {fmt(h.get('p95'), 2)} | {h['p99']:.2f} | {fmt(w.get('p95'), 2)} | {w['p99']:.2f} | {fmt(srv.get('cpu_s'), 2)} | "
            f"{r.get('listen_queue_overflows', '-')} |")


def is_cluster(rec):
    return "-cluster" in rec.get("target", "")


def step_at(rec, rate):
    """The traffic step of a record at an offered rate, or None."""
    for s in (rec.get("result") or {}).get("steps", []):
        if abs(s["offered_rate"] - rate) < 1e-9:
            return s
    return None


def cluster_problems(rec):
    """A cluster run whose broadcasts did not go through Redis measured the wrong thing."""
    if not is_cluster(rec):
        return []
    out = []
    for s in (rec.get("result") or {}).get("steps", []):
        rd = s.get("redis")
        if not rd:
            out.append(f"step {s['step']}: no Redis figures")
        elif rd.get("commands_per_message") is None:
            out.append(f"step {s['step']}: Redis commands not counted (INFO failed)")
        elif s.get("sent") and rd["commands_per_message"] < 1:
            out.append(f"step {s['step']}: {rd['commands_per_message']} Redis commands per message: "
                       "broadcasts did not go through Redis")
    return out


def cluster_section(records):
    """The standalone-against-cluster tables and the issue's goal for the fan-out."""
    if not any(is_cluster(r) for r in records):
        return []
    md = ["## Cluster against standalone", "",
          "Every server process is pinned to the same core (the standalone node; in the cluster every node "
          "and Redis), loadgen to the other. *node CPU* sums the nodes; *Redis CPU* is redis-server's alone; "
          "*Redis commands / broadcast* is the change of INFO `total_commands_processed` over the step "
          "divided by the messages sent in it.", ""]
    for scen, rates in (("fanout", (100, 500, 1000)), ("rooms", (5000, 20000))):
        failed = [r for r in records if r["scenario"] == scen and not r.get("result")]
        recs = [r for r in records if r["scenario"] == scen and r.get("result")]
        if not recs and not failed:
            continue
        md += [f"### {scen}", ""]
        head = "| target | highest rate with p99 < 50 ms, no loss | " + " | ".join(f"p99 ms at {r:,}/s" for r in rates)
        ref = rates[1] if scen == "fanout" else rates[0]
        if recs and not any(step_at(r, ref) for r in recs):
            # Another sweep (a smoke run): the highest rate every target ran.
            common = set.intersection(*[{s["offered_rate"] for s in r["result"].get("steps", [])} for r in recs])
            ref = max(common) if common else ref
        head += (f" | node CPU s / M deliveries at {ref:,g}/s | Redis CPU at {ref:,g}/s | Redis CPU s / M deliveries"
                 f" at {ref:,g}/s | Redis commands / broadcast at {ref:,g}/s |")
        md += [head, "|---|" + "---:|" * (len(rates) + 5)]
        for r in recs:
            best = r["result"].get("best_rate_under_slo")
            cells = [fmt(best["offered_rate"], 0) if best else "none"]
            for rate in rates:
                st = step_at(r, rate)
                cells.append(fmt(st["latency_ms"]["p99"], 2) if st else "-")
            st = step_at(r, ref) or {}
            srv, rd = st.get("server") or {}, st.get("redis") or {}
            cells += [fmt(srv.get("cpu_s_per_million_deliveries"), 2),
                      (fmt(100 * rd["cpu_frac_of_core"], 0) + "%") if rd else "-",
                      fmt(rd.get("cpu_s_per_million_deliveries"), 2) if rd else "-",
                      fmt(rd.get("commands_per_message"), 2) if rd else "-"]
            md.append(f"| {r['target']} | " + " | ".join(cells) + " |")
        for r in failed:
            md.append(f"| {r['target']} | did not run: {'; '.join(r['problems'][:2])} |" + " |" * (len(rates) + 4))
        md.append("")
        if scen == "fanout":
            md += cluster_goal(recs)
    return md


def cluster_goal(recs):
    """Issue 12's goal: the cluster carries >= 70% of standalone's highest rate, with p99 within
    standalone's + 5 ms at 500 msg/s."""
    alone = [r for r in recs if not is_cluster(r)]
    out = []
    for c in [r for r in recs if is_cluster(r)]:
        if not alone:
            break
        a = alone[0]
        ab, cb = a["result"].get("best_rate_under_slo"), c["result"].get("best_rate_under_slo")
        sa, sc = step_at(a, 500), step_at(c, 500)
        lines = []
        if ab and cb:
            share = cb["offered_rate"] / ab["offered_rate"]
            lines.append(f"highest rate {cb['offered_rate']:,.0f} msg/s against standalone's "
                         f"{ab['offered_rate']:,.0f}: {100 * share:.0f}% (goal ≥ 70%: "
                         f"{'met' if share >= 0.7 else 'missed'})")
        else:
            lines.append("highest rate: no step met the SLO for one of the two")
        if sa and sc:
            d = sc["latency_ms"]["p99"] - sa["latency_ms"]["p99"]
            lines.append(f"p99 at 500 msg/s {sc['latency_ms']['p99']:.2f} ms against standalone's "
                         f"{sa['latency_ms']['p99']:.2f} ms: {d:+.2f} ms (goal ≤ +5 ms: "
                         f"{'met' if d <= 5 else 'missed'})")
        out += [f"Goal for {c['target']}: " + "; ".join(lines) + ".", ""]
    return out


def write_report(records, outdir, args, plot_note):
    md = ["# chatterbox benchmark results", ""]
    md += env_lines(args)
    md += ["", "Latency is measured from each message's *intended* send time (open loop, no coordinated "
           "omission) to its arrival at each receiver. *server CPU* is utime+stime of the server "
           "process(es) over the step divided by the step's wall time; *CPU s / M deliveries* is "
           "server CPU seconds per million deliveries. *late* = deliveries that came after the "
           "step's drain time (seconds after the last send); *lost* = deliveries that never came. A note *loadgen-bound* means the generator says it was the limit at that step "
           "(its CPU near a full core, its send schedule more than 5 ms behind, one loop turn over "
           "50 ms, or preempted off its core by another process); *noise* means other processes "
           "on the machine took CPU during the step, or the server or loadgen waited to be "
           "scheduled. Steps with such notes are upper bounds on latency.", ""]
    md += cluster_section(records)
    for scen, title in (("fanout", "Fan-out: one room"), ("rooms", "Many rooms"),
                        ("joins", "Joins during fan-out")):
        recs = [r for r in records if r["scenario"] == scen]
        if not recs:
            continue
        p = ((recs[0].get("result") or {}).get("params")) or {}
        md += [f"## {title}", ""]
        if scen == "fanout":
            md += [f"{p.get('members', '?')} members in one room, {p.get('senders', '?')} of them senders; "
                   f"each step offers a fixed message rate for {p.get('duration_s', '?')} s; "
                   f"every message is delivered to every member (sender included).", ""]
        elif scen == "rooms":
            md += [f"{p.get('rooms', '?')} rooms of {p.get('room_size', '?')} members; every member sends "
                   f"to its own room; the offered rate is the total over all rooms.", ""]
        else:
            md += [f"The fan-out of {p.get('members', '?')} members, and {p.get('joiners', '?')} joiners that join "
                   f"{p.get('join_rate', '?')} rooms/s during each step (each room once) and leave again. These "
                   "rooms have no stored history here; `run --joins` measures joins that read cold history.", ""]
        if len(recs) > 1:
            md += ["| target | highest rate with p99 < SLO, no loss | deliveries/s there | p99 ms there | server CPU s / M deliveries there |",
                   "|---|---:|---:|---:|---:|"]
            for r in recs:
                res = r.get("result") or {}
                best = res.get("best_rate_under_slo")
                step = next((s for s in res.get("steps", []) if best and s["offered_rate"] == best["offered_rate"]), None)
                srv = (step or {}).get("server") or {}
                md.append(f"| {r['target']} | {fmt(best['offered_rate'], 0) if best else 'none'} | "
                          f"{fmt(best['deliveries_per_sec'], 0) if best else '-'} | "
                          f"{fmt(best['p99_ms'], 2) if best else '-'} | {fmt(srv.get('cpu_s_per_million_deliveries'), 2)} |")
            md.append("")
        for r in recs:
            md += [f"### {r['target']}", ""]
            if r.get("result") and r["result"].get("steps"):
                md.append(traffic_table(r))
            if r["problems"]:
                md += ["Problems: " + "; ".join(r["problems"][:8]), ""]
    recs = [r for r in records if r["scenario"] == "idle"]
    if recs:
        md += ["## Idle connections: server memory", ""]
        for r in recs:
            md += [f"### {r['target']}", "", idle_table(r)]
            if r["problems"]:
                md += ["Problems: " + "; ".join(r["problems"][:8]), ""]
    recs = [r for r in records if r["scenario"] == "storm"]
    if recs:
        p = ((recs[0].get("result") or {}).get("params")) or {}
        md += ["## Connection storm", "",
               f"{p.get('conns', '?')} connections opened as fast as possible, at most "
               f"{p.get('concurrency', '?')} handshakes in flight. Handshake = TCP connect to the 101 "
               "response; welcome = to chatterbox's `history` event (for peers, the same as the handshake). "
               "*listen-queue overflows* is the kernel's TcpExt ListenOverflows count during the storm: "
               "connections dropped because the server's accept queue was full (each costs the client a "
               "1 s SYN retransmit).", "",
               "| target | completed | handshakes/s | handshake p50 ms | handshake p95 ms | handshake p99 ms | welcome p95 ms | welcome p99 ms | server CPU s | listen-queue overflows |",
               "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        md += [storm_row(r) for r in recs]
        for r in recs:
            if r["problems"]:
                md += ["", f"Problems ({r['target']}): " + "; ".join(r["problems"][:8])]
        md.append("")
    md += ["## Plots", "", plot_note, "", "## Commands", ""]
    md += [f"- {r['target']} / {r['scenario']}: `{r.get('command', '(did not start)')}`" for r in records]
    md.append("")
    with open(os.path.join(outdir, "results.md"), "w") as f:
        f.write("\n".join(md))


def make_plots(outdir, args):
    if args.no_plots:
        return "Plots skipped (--no-plots)."
    py = VENV_PY
    if not os.path.exists(py) or subprocess.run([py, "-c", "import matplotlib"], capture_output=True).returncode:
        if args.smoke:
            return "Plots skipped: no matplotlib in benchmark/.venv (a full run installs it)."
        log("installing matplotlib into benchmark/.venv")
        try:
            subprocess.run([sys.executable, "-m", "venv", os.path.join(BENCH, ".venv")], check=True, timeout=300)
            subprocess.run([py, "-m", "pip", "install", "-q", "matplotlib"], check=True, timeout=600)
        except Exception as e:
            return f"Plots impossible here: could not install matplotlib ({e})."
    r = subprocess.run([py, os.path.join(BENCH, "plot.py"), os.path.join(outdir, "summary.json"), outdir],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return f"Plotting failed: {r.stderr.strip()[-500:]}"
    pngs = [l for l in r.stdout.split() if l.endswith(".png")]
    return "\n".join(f"![{p}]({p})" for p in pngs) or "No data to plot."
