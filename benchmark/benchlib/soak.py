"""`run --soak`: one chatterbox and one `loadgen soak`, the server sampled from /proc and
/api/stats, and the verdict (RSS and fds settled vs end, plus every loadgen check)."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

from .common import BENCH, LOADGEN, ROOT, build, env_lines, fmt, free_port, log, median, pinned
from .targets import Target

SOAK_DEFAULTS = {"rooms": 20, "room_size": 25, "senders_per_room": 2, "rate": 500, "churners": 50,
                 "dwell": 10, "resume_every": 10}
RSS_TOLERANCE = 0.05        # end RSS within 5% of settled
FD_TOLERANCE = (0.05, 10)   # end fds within 5% or 10 of settled


def proc_sample(pid):
    """VmRSS (kB), open fds and CPU seconds (utime+stime) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        fields = st[st.rfind(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return rss, fds, cpu
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class SoakSampler(threading.Thread):
    """Every `interval` s: the server's RSS, fds and CPU from /proc, and /api/stats."""

    def __init__(self, pid, port, interval):
        super().__init__(daemon=True)
        self.pid, self.port, self.interval = pid, port, interval
        self.samples = []
        self.stop_event = threading.Event()

    def run(self):
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            t_ns = time.monotonic_ns()
            p = proc_sample(self.pid)
            stats = None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/stats", timeout=2) as r:
                    stats = json.loads(r.read())
            except Exception as e:
                stats = {"error": str(e)[:200]}
            self.samples.append({"t_mono_ns": t_ns, "rss_kb": p[0] if p else None,
                                 "fds": p[1] if p else None, "cpu_s": p[2] if p else None,
                                 "stats": stats})
            next_t += self.interval
            self.stop_event.wait(max(0.0, next_t - time.monotonic()))


def soak_windows(seconds):
    """(settled, end) windows in seconds from the start of traffic: minutes 2-3 and the last
    minute; runs shorter than 5 minutes use the same fractions (10-30% and the last 10%)."""
    if seconds >= 300:
        return (60.0, 180.0), (seconds - 60.0, float(seconds))
    return (0.1 * seconds, 0.3 * seconds), (0.9 * seconds, float(seconds))


def soak_verdict(samples, lg, seconds):
    t0 = lg.get("t0_mono_ns")
    problems = list(lg.get("problems", []))
    if t0 is None:
        return {"pass": False, "problems": problems or ["loadgen produced no result"]}, []
    for s in samples:
        s["t_s"] = round((s["t_mono_ns"] - t0) / 1e9, 3)
    (s0, s1), (e0, e1) = soak_windows(seconds)
    settled = [s for s in samples if s0 <= s["t_s"] < s1]
    end = [s for s in samples if e0 <= s["t_s"] < e1]
    v = {"settled_window_s": [s0, s1], "end_window_s": [e0, e1],
         "settled_samples": len(settled), "end_samples": len(end)}
    for key in ("rss_kb", "fds"):
        v[f"settled_{key}"] = median(s[key] for s in settled)
        v[f"end_{key}"] = median(s[key] for s in end)
    checks = []
    if v["settled_rss_kb"] is None or v["end_rss_kb"] is None:
        checks.append("no RSS samples in the settled or the end window")
    else:
        d = v["end_rss_kb"] - v["settled_rss_kb"]
        v["rss_change_pct"] = round(100.0 * d / v["settled_rss_kb"], 2)
        if abs(d) > RSS_TOLERANCE * v["settled_rss_kb"]:
            checks.append(f"RSS moved {v['rss_change_pct']:+.1f}% from settled "
                          f"({v['settled_rss_kb']} kB) to end ({v['end_rss_kb']} kB), more than "
                          f"{100 * RSS_TOLERANCE:.0f}%")
    if v["settled_fds"] is None or v["end_fds"] is None:
        checks.append("no fd samples in the settled or the end window")
    else:
        d = v["end_fds"] - v["settled_fds"]
        v["fds_change"] = d
        if abs(d) > max(FD_TOLERANCE[0] * v["settled_fds"], FD_TOLERANCE[1]):
            checks.append(f"open fds moved by {d:+} from settled ({v['settled_fds']}) to end "
                          f"({v['end_fds']}), more than 5% or {FD_TOLERANCE[1]}")
    v["pass"] = not checks and not problems
    v["problems"] = checks + problems
    return v, samples


def soak_rows(samples, lg):
    """One row per loadgen bucket (a minute by default), joined with the server samples in it."""
    rows = []
    for b in lg.get("buckets", []):
        inside = [s for s in samples if b["t_start_s"] <= s.get("t_s", -1) < b["t_end_s"]]
        c = b["counters"]
        cpu = [s["cpu_s"] for s in inside if s.get("cpu_s") is not None]
        conns = [(s.get("stats") or {}).get("connections") for s in inside]
        rows.append({
            "bucket": b["index"] + 1, "t_start_s": b["t_start_s"], "t_end_s": b["t_end_s"],
            "samples": len(inside),
            "rss_kb": median(s["rss_kb"] for s in inside), "fds": median(s["fds"] for s in inside),
            "connections": median(conns),
            "server_cpu_pct": round(100 * (cpu[-1] - cpu[0]) / max(1e-9, inside[-1]["t_s"] - inside[0]["t_s"]), 1)
            if len(cpu) > 1 else None,
            "steady_sent": c["steady_sent"], "churn_msgs": c["churn_msgs_sent"],
            "deliveries_checked": c["room_msgs_checked"], "churn_cycles": c["churn_cycles"],
            "gaps": c["gaps"], "dups": c["duplicates"], "out_of_order": c["out_of_order"],
            "acks_missing": c["acks_missing"], "resume_ok": c["resume_ok"],
            "resume_failures": c["resume_failures"], "errors": c["server_errors"],
            "p50_ms": b["latency_ms"]["p50"], "p95_ms": b["latency_ms"].get("p95"),
            "p99_ms": b["latency_ms"]["p99"],
            "max_ms": b["latency_ms"]["max"],
        })
    return rows


def write_soak_report(outdir, args, params, cmd, verdict, rows, lg, server_exit, seconds):
    mib = lambda kb: f"{kb / 1024:.1f}" if kb is not None else "-"
    unit = "minute" if abs(float(params["bucket"]) - 60) < 1e-9 else f"{float(params['bucket']):g} s bucket"
    tot = lg.get("totals", {})
    c = tot.get("counters", {})
    lat = tot.get("latency_ms", {})
    md = ["# chatterbox soak", ""]
    md += env_lines(args)
    md += [f"- loadgen: `{cmd}`", ""]
    md += [f"**Verdict: {'PASS' if verdict.get('pass') else 'FAIL'}**", ""]
    if verdict.get("settled_rss_kb") is not None:
        md += ["| | settled (median, t = {:.0f}–{:.0f} s) | end (median, t = {:.0f}–{:.0f} s) | change |".format(
                   *verdict["settled_window_s"], *verdict["end_window_s"]),
               "|---|---:|---:|---:|",
               f"| server RSS | {mib(verdict['settled_rss_kb'])} MiB | {mib(verdict['end_rss_kb'])} MiB | "
               f"{verdict.get('rss_change_pct', 0):+.2f}% |",
               f"| open fds | {verdict['settled_fds']:g} | {verdict['end_fds']:g} | {verdict.get('fds_change', 0):+g} |",
               ""]
    if verdict.get("problems"):
        md += ["Problems:", ""] + [f"- {p}" for p in verdict["problems"][:30]] + [""]
    md += [f"PASS needs end RSS within {100 * RSS_TOLERANCE:.0f}% of settled, end fds within "
           f"{100 * FD_TOLERANCE[0]:.0f}% or {FD_TOLERANCE[1]} of settled, and zero gaps, duplicates, "
           "out-of-order ids, missing acks, acked-but-undelivered messages, resume failures, steady "
           "messages lost, server errors and server-side closes. Settled = median of the samples in "
           "minutes 2–3 of traffic (after warm-up), end = median of the last minute (runs shorter than "
           "5 minutes: 10–30% and the last 10% of the run); the server is "
           f"sampled every {float(params['sample']):g} s.", ""]
    md += ["## Load", "",
           f"- {params['rooms']} rooms × {params['room_size']} stable members "
           f"({params['rooms'] * params['room_size']} connections for the whole run, each also in `general`); "
           f"{params['senders_per_room']} steady senders per room, {float(params['rate']):g} msg/s in total, open loop",
           f"- {params['churners']} churners at once: connect (half with `?name=`), join 1–3 rooms, "
           f"1–4 messages with `request_id` (acks checked), 30% `leave` one room, then close frame (50%), "
           f"FIN (25%) or RST (25%); mean {float(params['dwell']):g} s connected per cycle",
           f"- a resume check (disconnect, come back with `join` + `since`) every {float(params['resume_every']):g} s",
           f"- store: {args.db}; {seconds:.0f} s of traffic", ""]
    md += ["## Totals", "",
           f"- steady messages sent: {c.get('steady_sent', 0):,}; steady deliveries {c.get('steady_delivered', 0):,} "
           f"of {tot.get('steady_expected', 0):,} expected (lost {tot.get('steady_lost', 0)})",
           f"- room deliveries checked (every id against the last + 1): {c.get('room_msgs_checked', 0):,}; "
           f"gaps {c.get('gaps', 0)}, duplicates {c.get('duplicates', 0)}, out of order {c.get('out_of_order', 0)}, "
           f"sender-sequence gaps {c.get('seq_gaps', 0)}",
           f"- churn cycles: {c.get('churn_cycles', 0):,} ({c.get('named_connects', 0):,} with `?name=`, "
           f"{c.get('connects', 0) / max(1.0, seconds):,.1f} connects/s); "
           f"closes: {c.get('closes_clean', 0):,} clean, {c.get('closes_fin', 0):,} FIN, {c.get('closes_rst', 0):,} RST; "
           f"{c.get('leaves', 0):,} leaves; connect failures {c.get('connect_failures', 0)}",
           f"- churn messages: {c.get('churn_msgs_sent', 0):,} sent, {c.get('acks', 0):,} acks (messages + leaves), "
           f"missing {c.get('acks_missing', 0)}, acked but not delivered with that id {tot.get('acked_not_delivered', 0)}; "
           f"ack latency p95 {tot.get('ack_latency_ms', {}).get('p95', '-')} ms, p99 {tot.get('ack_latency_ms', {}).get('p99', '-')} ms",
           f"- resume checks: {c.get('resume_checks', 0)} ({c.get('resume_ok', 0)} ok, {c.get('resume_failures', 0)} failed), "
           f"{c.get('resume_replayed', 0):,} messages replayed",
           f"- steady latency (intended send → arrival): p50 {lat.get('p50', '-')} ms, p95 {lat.get('p95', '-')} ms, "
           f"p99 {lat.get('p99', '-')} ms, "
           f"p99.9 {lat.get('p999', '-')} ms, max {lat.get('max', '-')} ms",
           f"- server errors {c.get('server_errors', 0)}, closes by the server {c.get('unexpected_closes', 0)}; "
           f"server exit status {server_exit}", ""]
    md += [f"## Per {unit}", "",
           f"| {unit} | RSS MiB | fds | connections | server CPU | steady sent | deliveries checked | churn cycles | "
           "gaps | dups | out of order | acks missing | resume ok/failed | p50 ms | p95 ms | p99 ms | max ms |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cpu = f"{r['server_cpu_pct']:.0f}%" if r["server_cpu_pct"] is not None else "-"
        md.append(f"| {r['bucket']} | {mib(r['rss_kb'])} | {fmt(r['fds'], 0)} | {fmt(r['connections'], 0)} | {cpu} | "
                  f"{r['steady_sent']:,} | {r['deliveries_checked']:,} | {r['churn_cycles']:,} | {r['gaps']} | "
                  f"{r['dups']} | {r['out_of_order']} | {r['acks_missing']} | {r['resume_ok']}/{r['resume_failures']} | "
                  f"{r['p50_ms']:.2f} | {fmt(r['p95_ms'], 2)} | {r['p99_ms']:.2f} | {r['max_ms']:.2f} |")
    md += ["", "*connections* is the server's own count (`/api/stats`, median of the samples); RSS and fds "
           "are medians of the samples in the row; *deliveries checked* counts every numbered room "
           "message a stable member or a churner received. Raw data: `soak.json` (every sample, every "
           "bucket) and `loadgen.json`; the server's output: `server.log`.", ""]
    notes = lg.get("notes") or []
    if notes:
        md += ["## Notes from loadgen", ""] + [f"- {n}" for n in notes[:30]] + [""]
    with open(os.path.join(outdir, "soak.md"), "w") as f:
        f.write("\n".join(md))


def run_soak(args):
    if getattr(args, "cluster", None):
        from .cluster_soak import run_cluster_soak
        return run_cluster_soak(args)
    if args.db == "both":
        sys.exit("--soak runs one store: --db memory or --db sqlite")
    seconds = float(args.soak_seconds)
    if not 10 <= seconds <= 7200:
        sys.exit("--soak-seconds must be 10..7200")
    params = dict(SOAK_DEFAULTS)
    for k in list(params):
        v = getattr(args, "soak_" + k, None)
        if v is not None:
            params[k] = v
    params["bucket"] = args.soak_bucket or (60 if seconds >= 300 else max(1.0, seconds / 10))
    params["sample"] = args.soak_sample
    outdir = os.path.abspath(args.out or os.path.join(BENCH, "results", "soak"))
    os.makedirs(outdir, exist_ok=True)
    build(args.no_build)
    env_lines(args)
    target = Target("chatterbox", args.db)
    port = free_port()
    logfile = os.path.join(outdir, "server.log")
    lgfile = os.path.join(outdir, "loadgen.json")
    if os.path.exists(lgfile):
        os.remove(lgfile)
    t_begin = time.time()
    pid = target.start(port, logfile, args.server_core)[0]
    sampler = SoakSampler(pid, port, float(args.soak_sample))
    sampler.start()
    cmd = [LOADGEN, "soak", "--target", f"127.0.0.1:{port}", "--proto", "chatterbox", "--src-ips", "8",
           "--label", target.label, "--out", lgfile, "--seconds", str(seconds),
           "--max-seconds", str(int(seconds + 300)),
           "--rooms", params["rooms"], "--room-size", params["room_size"],
           "--senders-per-room", params["senders_per_room"], "--rate", params["rate"],
           "--churners", params["churners"], "--dwell", params["dwell"],
           "--resume-every", params["resume_every"], "--bucket", params["bucket"]]
    if args.quiet:
        cmd.append("--quiet")
    cmd = [str(x) for x in cmd]
    shown = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
    log(f"soak: chatterbox ({args.db}) pid {pid} on port {port}; {shown}")
    problems = []
    try:
        lg_proc = subprocess.Popen(pinned(args.gen_core, cmd))
        try:
            rc = lg_proc.wait(timeout=seconds + 420)
        except subprocess.TimeoutExpired:
            lg_proc.kill()
            lg_proc.wait(timeout=10)
            rc = "timeout"
    except KeyboardInterrupt:
        sampler.stop_event.set()
        target.stop()
        log("interrupted; server stopped")
        return 130
    finally:
        sampler.stop_event.set()
        sampler.join(timeout=10)
    alive = target.alive()
    server_exit = target.stop()
    if rc not in (0, 2):
        problems.append(f"loadgen exit {rc}")
    if not alive:
        problems.append(f"the server died during the soak (exit {server_exit}), see {logfile}")
    elif server_exit != 0:
        problems.append(f"the server exited {server_exit} on SIGTERM")
    lg = {}
    if os.path.exists(lgfile):
        with open(lgfile) as f:
            lg = json.load(f)
    else:
        problems.append("loadgen wrote no result")
    verdict, samples = soak_verdict(sampler.samples, lg, seconds)
    verdict["problems"] += problems
    verdict["pass"] = verdict["pass"] and not problems
    rows = soak_rows(samples, lg)
    with open(os.path.join(outdir, "soak.json"), "w") as f:
        json.dump({"verdict": verdict, "params": params, "db": args.db, "seconds": seconds,
                   "command": shown, "server_exit": server_exit, "rows": rows,
                   "totals": lg.get("totals"), "samples": samples}, f, indent=1)
    write_soak_report(outdir, args, params, shown, verdict, rows, lg, server_exit, seconds)
    log(f"soak {'PASS' if verdict['pass'] else 'FAIL'} in {time.time() - t_begin:.0f} s: "
        f"RSS {verdict.get('settled_rss_kb')} -> {verdict.get('end_rss_kb')} kB, "
        f"fds {verdict.get('settled_fds')} -> {verdict.get('end_fds')}; "
        f"{os.path.relpath(outdir, ROOT)}/soak.md")
    for p in verdict["problems"][:10]:
        log(f"  {p}")
    return 0 if verdict["pass"] else 1
