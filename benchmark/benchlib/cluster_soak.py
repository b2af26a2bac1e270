"""`run --soak --cluster N`: the soak against N chatterbox nodes sharing one Redis, the last
node killed with SIGKILL half way (`--soak-kill-at`) and restarted on its port after
`--soak-down` seconds.

loadgen runs `soak --failover` over the N addresses (stable member i on node i % N, churners
moving to the next node every cycle): members of the killed node come back on another node and
join with `since`; every id is still checked (0 gaps, 0 duplicates), and every acked message
must be in Redis at the end (`ZRANGE` of the room's history key, its stamp the acked one).
Each node's RSS and fds are sampled every `--soak-sample` s; the verdict holds each node's end
against its own settled window (the restarted node: counted from its restart).
"""

import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

from .cluster import REDIS_SERVER, Node, Redis, free_ports, redis_call, resp_parse
from .common import BENCH, LOADGEN, ROOT, build, chatterbox_bins, env_lines, fmt, log, median, pinned
from .soak import FD_TOLERANCE, RSS_TOLERANCE, SOAK_DEFAULTS, proc_sample, soak_rows, write_soak_report

STAMP = re.compile(r"~(\d+)\.(\d+)\.(\d+)\.(\d+)\.(\d+)~")
# A loss may be seen this long after the kill was sent / the node was back up (seconds).
LOSS_SLACK_BEFORE, LOSS_SLACK_AFTER = 0.2, 5.0


class ClusterSampler(threading.Thread):
    """Every `interval` s: each node's RSS, fds and CPU (its current process), Redis's, and
    `/api/stats` from node 0 (never killed)."""

    def __init__(self, nodes, redis, interval):
        super().__init__(daemon=True)
        self.nodes, self.redis, self.interval = nodes, redis, interval
        self.samples = []
        self.stop_event = threading.Event()
        # CPU of processes that are gone (the killed node), so the sums stay monotonic.
        self.cpu_gone = [0.0] * len(nodes)
        self.last_cpu = [0.0] * len(nodes)
        self.last_pid = [None] * len(nodes)
        self.lock = threading.Lock()

    def run(self):
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            self.take()
            next_t += self.interval
            self.stop_event.wait(max(0.0, next_t - time.monotonic()))

    def take(self):
        with self.lock:
            t_ns = time.monotonic_ns()
            per = []
            for i, node in enumerate(self.nodes):
                pid = node.pid if node.alive() else None
                if pid != self.last_pid[i] and self.last_pid[i] is not None:
                    self.cpu_gone[i] += self.last_cpu[i]
                    self.last_cpu[i] = 0.0
                self.last_pid[i] = pid
                p = proc_sample(pid) if pid else None
                if p:
                    self.last_cpu[i] = p[2]
                per.append({"index": i, "pid": pid, "rss_kb": p[0] if p else None, "fds": p[1] if p else None,
                            "cpu_s": round(self.cpu_gone[i] + (p[2] if p else self.last_cpu[i]), 3)})
            rp = proc_sample(self.redis.pid) if self.redis.alive() else None
            stats = None
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.nodes[0].port}/api/stats", timeout=2) as r:
                    stats = json.loads(r.read())
            except Exception as e:
                stats = {"error": str(e)[:200]}
            live = [n for n in per if n["rss_kb"] is not None]
            self.samples.append({
                "t_mono_ns": t_ns, "nodes": per,
                "rss_kb": sum(n["rss_kb"] for n in live) if live else None,
                "fds": sum(n["fds"] for n in live) if live else None,
                "cpu_s": round(sum(n["cpu_s"] for n in per), 3),
                "redis": {"rss_kb": rp[0] if rp else None, "cpu_s": rp[2] if rp else None},
                "stats": stats,
            })


class T0Watch(threading.Thread):
    """Forwards loadgen's stderr and notes its traffic start (`soak: traffic t0_mono_ns=N`)."""

    def __init__(self, stream, quiet):
        super().__init__(daemon=True)
        self.stream, self.quiet = stream, quiet
        self.t0 = None
        self.started = threading.Event()

    def run(self):
        for line in self.stream:
            m = re.search(r"traffic t0_mono_ns=(\d+)", line)
            if m:
                self.t0 = int(m.group(1))
                self.started.set()
            if not self.quiet or "PROBLEM" in line:
                sys.stderr.write(line)


def phase_windows(a, b):
    """(settled, end) windows of a phase from `a` to `b` seconds of traffic: minutes 2-3 of it
    and its last minute; phases shorter than 5 minutes use the same fractions (10-30% and the
    last 10%)."""
    span = b - a
    if span >= 300:
        return (a + 60.0, a + 180.0), (b - 60.0, float(b))
    return (a + 0.1 * span, a + 0.3 * span), (b - 0.1 * span, float(b))


def node_verdicts(samples, seconds, n, kill):
    """Per node and phase (before the kill; after the killed node is back: the connections of
    the killed node move to the others, so each phase has its own level): settled and end RSS
    and fds (medians of the node's samples), and the checks."""
    phases = [(0.0, seconds)]
    if kill and kill.get("t_kill_s") is not None and kill.get("t_up_s") is not None:
        phases = [(0.0, kill["t_kill_s"]), (kill["t_up_s"], seconds)]
    out, problems = [], []
    for i in range(n):
        for k, (a, b) in enumerate(phases):
            (s0, s1), (e0, e1) = phase_windows(a, b)
            pick = lambda lo, hi: [s["nodes"][i] for s in samples
                                   if lo <= s["t_s"] < hi and s["nodes"][i]["rss_kb"]]
            st, en = pick(s0, s1), pick(e0, e1)
            phase = "whole run" if len(phases) == 1 else ("before the kill" if k == 0 else "after the restart")
            v = {"node": i, "phase": phase, "settled_window_s": [round(s0, 1), round(s1, 1)],
                 "end_window_s": [round(e0, 1), round(e1, 1)],
                 "settled_rss_kb": median(x["rss_kb"] for x in st), "end_rss_kb": median(x["rss_kb"] for x in en),
                 "settled_fds": median(x["fds"] for x in st), "end_fds": median(x["fds"] for x in en)}
            if v["settled_rss_kb"] is None or v["end_rss_kb"] is None:
                problems.append(f"node {i} ({phase}): no RSS samples in its settled or end window")
            else:
                d = v["end_rss_kb"] - v["settled_rss_kb"]
                v["rss_change_pct"] = round(100.0 * d / v["settled_rss_kb"], 2)
                if abs(d) > RSS_TOLERANCE * v["settled_rss_kb"]:
                    problems.append(f"node {i} ({phase}): RSS moved {v['rss_change_pct']:+.1f}% from settled "
                                    f"({v['settled_rss_kb']} kB) to end ({v['end_rss_kb']} kB), more than "
                                    f"{100 * RSS_TOLERANCE:.0f}%")
            if v["settled_fds"] is not None and v["end_fds"] is not None:
                d = v["end_fds"] - v["settled_fds"]
                v["fds_change"] = d
                if abs(d) > max(FD_TOLERANCE[0] * v["settled_fds"], FD_TOLERANCE[1]):
                    problems.append(f"node {i} ({phase}): open fds moved by {d:+} from settled "
                                    f"({v['settled_fds']}) to end ({v['end_fds']})")
            out.append(v)
    return out, problems


def check_losses(lg, kill):
    """Every loss loadgen saw must be at the killed node, between the kill and a few seconds
    after it was back. Returns (summary, problems)."""
    fo = (lg.get("failover") or {})
    losses = fo.get("losses") or []
    problems, by = [], {}
    for ev in losses:
        by[f"{ev['what']} at node {ev['target']}"] = by.get(f"{ev['what']} at node {ev['target']}", 0) + 1
    if kill is None:
        if losses:
            problems.append(f"{len(losses)} connections lost with no node killed")
        return {"by_kind": by}, problems
    lo = kill["t_kill_mono_ns"] - LOSS_SLACK_BEFORE * 1e9
    hi = (kill.get("t_up_mono_ns") or kill["t_kill_mono_ns"]) + LOSS_SLACK_AFTER * 1e9
    outside = [ev for ev in losses if ev["target"] != kill["node"] or not lo <= ev["t_mono_ns"] <= hi]
    if outside:
        problems.append(f"{len(outside)} connection losses not explained by the kill (another node, or outside "
                        f"the kill .. restart + {LOSS_SLACK_AFTER:g} s window), first: {outside[:3]}")
    if not losses:
        problems.append("the killed node's connections were never seen lost (did the kill happen?)")
    times = [ev["t_mono_ns"] for ev in losses]
    return {"by_kind": by, "count": len(losses),
            "first_s_after_kill": round((min(times) - kill["t_kill_mono_ns"]) / 1e9, 3) if times else None,
            "last_s_after_kill": round((max(times) - kill["t_kill_mono_ns"]) / 1e9, 3) if times else None,
            "outside_window": len(outside)}, problems


def history_keys(port):
    """Room name -> its history key in Redis (`cb:h:ROOM`, braces or not)."""
    keys = resp_parse(redis_call(port, "KEYS", "cb:h:*", timeout=10)) or []
    out = {}
    for k in keys:
        if isinstance(k, str):
            name = k[len("cb:h:"):]
            if name.startswith("{") and name.endswith("}"):
                name = name[1:-1]
            out[name] = k
    return out


def check_acked_in_redis(port, lg):
    """Every acked churner message (room, id, cycle, seq) must be in the room's history in
    Redis with that id and that stamp. Returns (summary, problems)."""
    acked = ((lg.get("failover") or {}).get("acked")) or []
    if not acked:
        return {"acked": 0}, ["no acked messages to look for in Redis"]
    keys = history_keys(port)
    stored = {}
    for room in sorted({a[0] for a in acked}):
        ids = {}
        key = keys.get(room)
        if key:
            reply = resp_parse(redis_call(port, "ZRANGE", key, 0, -1, "WITHSCORES", timeout=30))
            if isinstance(reply, list):
                for member, score in zip(reply[0::2], reply[1::2]):
                    try:
                        # The stored JSON, then "\n" and the sender's meta (chatterbox.lua).
                        msg = json.loads(member.split("\n", 1)[0]).get("message", "")
                    except (ValueError, AttributeError):
                        msg = member
                    m = STAMP.search(msg or "")
                    ids[int(float(score))] = tuple(int(x) for x in m.groups()[:4]) if m else None
        stored[room] = ids
    missing, wrong, lows = 0, 0, []
    for room, mid, cycle, seq in acked:
        ids = stored.get(room, {})
        if mid not in ids:
            missing += 1
            if len(lows) < 5:
                lows.append(f"{room}/{mid} not in Redis")
        elif ids[mid] is None or ids[mid][1] != cycle or ids[mid][3] != seq or ids[mid][0] != 2:
            wrong += 1
            if len(lows) < 5:
                lows.append(f"{room}/{mid} in Redis is {ids[mid]}, acked (2, {cycle}, _, {seq})")
    oldest = {r: min(v) for r, v in stored.items() if v}
    summary = {"acked": len(acked), "rooms": len(stored), "missing": missing, "wrong": wrong,
               "stored_messages": sum(len(v) for v in stored.values()), "oldest_ids": oldest}
    problems = []
    if missing or wrong:
        problems.append(f"acked messages not in Redis: {missing} missing, {wrong} with another message at "
                        f"their id ({'; '.join(lows)})")
    return summary, problems


def history_cap(params, seconds):
    """`--cluster-history-per-room` for the soak: every message of the run stays in Redis, so
    that every acked one can be found there at the end."""
    per_room = float(params["rate"]) / max(1, int(params["rooms"])) + 5.0
    return max(1000, int(math.ceil(per_room * (seconds + 120) * 1.2)))


# `run --smoke --cluster N`: a soak of a few seconds with the kill, to check the failover path.
SMOKE_SOAK = {"soak_seconds": 12, "soak_rooms": 4, "soak_room_size": 10, "soak_rate": 100,
              "soak_churners": 10, "soak_resume_every": 3, "soak_dwell": 2, "soak_sample": 0.5,
              "soak_kill_at": 5, "soak_down": 1, "soak_no_memory_check": True}


def run_cluster_soak(args):
    if not os.access(REDIS_SERVER, os.X_OK):
        print(f"[bench] soak --cluster needs redis-server ({REDIS_SERVER}): apt-get install redis-server",
              file=sys.stderr)
        return 1
    n = int(args.cluster)
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
    kill_at = float(args.soak_kill_at) if args.soak_kill_at is not None else seconds / 2
    down = float(args.soak_down)
    if not 0 < kill_at < seconds or down < 0:
        sys.exit("--soak-kill-at must be inside the traffic and --soak-down >= 0")
    outdir = os.path.abspath(args.out or os.path.join(BENCH, "results", "cluster", "soak"))
    os.makedirs(outdir, exist_ok=True)
    build(args.no_build, cluster=True)
    env_lines(args)
    lgfile = os.path.join(outdir, "loadgen.json")
    if os.path.exists(lgfile):
        os.remove(lgfile)
    cap = history_cap(params, seconds)
    extra = ["--cluster-history-per-room", str(cap)]
    redis = Redis()
    binary = chatterbox_bins(args)[0][1]
    nodes = [Node(binary, i) for i in range(n)]
    logs = [os.path.join(outdir, f"node{i}.log") for i in range(n)]
    for f in logs:
        if os.path.exists(f):
            os.remove(f)
    t_begin = time.time()
    problems, kill = [], None
    try:
        ports = free_ports(n + 1)
        redis.start(os.path.join(outdir, "redis.log"), args.server_core, port=ports[0])
        for node, f, p in zip(nodes, logs, ports[1:]):
            node.start(redis.url, f, args.server_core, port=p, extra=extra)
        for node, f in zip(nodes, logs):
            node.wait_ready(f)
        time.sleep(0.3)
        sampler = ClusterSampler(nodes, redis, float(args.soak_sample))
        sampler.start()
        addrs = ",".join(f"127.0.0.1:{node.port}" for node in nodes)
        cmd = [LOADGEN, "soak", "--failover", "--target", addrs, "--proto", "chatterbox", "--src-ips", "8",
               "--label", f"chatterbox-cluster{n}", "--out", lgfile, "--seconds", str(seconds),
               "--max-seconds", str(int(seconds + 300)),
               "--rooms", params["rooms"], "--room-size", params["room_size"],
               "--senders-per-room", params["senders_per_room"], "--rate", params["rate"],
               "--churners", params["churners"], "--dwell", params["dwell"],
               "--resume-every", params["resume_every"], "--bucket", params["bucket"]]
        if args.quiet:
            cmd.append("--quiet")
        cmd = [str(x) for x in cmd]
        shown = " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)
        log(f"soak --cluster {n}: redis pid {redis.pid} port {redis.port}; nodes "
            + ", ".join(f"{node.pid}@{node.port}" for node in nodes)
            + f"; node {n - 1} killed at t={kill_at:g}s for {down:g}s; {shown}")
        lg_proc = subprocess.Popen(pinned(args.gen_core, cmd), stderr=subprocess.PIPE, text=True)
        watch = T0Watch(lg_proc.stderr, args.quiet)
        watch.start()
        victim = nodes[-1]
        if watch.started.wait(timeout=180) and watch.t0:
            wait = (watch.t0 + kill_at * 1e9 - time.monotonic_ns()) / 1e9
            if wait > 0 and lg_proc.poll() is None:
                lg_proc_wait(lg_proc, wait)
            if lg_proc.poll() is None:
                kill = {"node": n - 1, "port": victim.port, "pid": victim.pid, "t_kill_mono_ns": time.monotonic_ns()}
                kill["exit"] = victim.kill()
                sampler.take()
                log(f"soak: node {n - 1} (pid {kill['pid']}) killed with SIGKILL at "
                    f"t={(kill['t_kill_mono_ns'] - watch.t0) / 1e9:.1f}s")
                time.sleep(down)
                victim.start(redis.url, logs[-1], args.server_core, port=victim.port, extra=extra)
                try:
                    victim.wait_ready(logs[-1])
                    kill["t_up_mono_ns"] = time.monotonic_ns()
                    kill["new_pid"] = victim.pid
                    log(f"soak: node {n - 1} back on port {victim.port} (pid {victim.pid}) after "
                        f"{(kill['t_up_mono_ns'] - kill['t_kill_mono_ns']) / 1e9:.1f}s")
                except RuntimeError as e:
                    problems.append(f"the killed node did not come back: {e}")
        else:
            problems.append("loadgen never started its traffic")
        try:
            rc = lg_proc.wait(timeout=seconds + 420)
        except subprocess.TimeoutExpired:
            lg_proc.kill()
            lg_proc.wait(timeout=10)
            rc = "timeout"
        watch.join(timeout=5)
        sampler.stop_event.set()
        sampler.join(timeout=10)
        lg = {}
        if os.path.exists(lgfile):
            with open(lgfile) as f:
                lg = json.load(f)
        else:
            problems.append("loadgen wrote no result")
        redis_check, rp = ({}, [])
        if lg and redis.alive():
            redis_check, rp = check_acked_in_redis(redis.port, lg)
        problems += rp
        alive = [node.alive() for node in nodes]
        codes = [node.stop() for node in nodes]
    except KeyboardInterrupt:
        for node in nodes:
            node.cleanup()
        redis.stop()
        log("interrupted; servers stopped")
        return 130
    finally:
        for node in nodes:
            node.cleanup()
        redis_exit = redis.stop()
    if rc not in (0, 2):
        problems.append(f"loadgen exit {rc}")
    for i, (a, c) in enumerate(zip(alive, codes)):
        if not a:
            problems.append(f"node {i} died during the soak (exit {c}), see node{i}.log")
        elif c != 0:
            problems.append(f"node {i} exited {c} on SIGTERM")
    problems += list(lg.get("problems", []))
    t0 = lg.get("t0_mono_ns") or watch.t0
    samples = sampler.samples
    for s in samples:
        s["t_s"] = round((s["t_mono_ns"] - (t0 or 0)) / 1e9, 3)
    if kill and t0:
        kill["t_kill_s"] = round((kill["t_kill_mono_ns"] - t0) / 1e9, 3)
        if kill.get("t_up_mono_ns"):
            kill["t_up_s"] = round((kill["t_up_mono_ns"] - t0) / 1e9, 3)
    nv, vp = node_verdicts(samples, seconds, n, kill)
    if getattr(args, "soak_no_memory_check", False):
        # A smoke run checks the harness and the failover, not memory (too short to settle).
        vp = []
    losses, lp = check_losses(lg, kill)
    problems = vp + lp + problems
    if kill is None:
        problems.append("no node was killed")
    c = ((lg.get("totals") or {}).get("counters")) or {}
    verdict = {"pass": not problems, "problems": problems, "nodes": nv, "kill": kill, "losses": losses,
               "redis_check": redis_check, "history_per_room": cap}
    rows = soak_rows(samples, lg) if t0 else []
    for r in rows:
        inside = [s for s in samples if r["t_start_s"] <= s["t_s"] < r["t_end_s"]]
        r["node_rss_kb"] = [median(s["nodes"][i]["rss_kb"] for s in inside) for i in range(n)]
        rc_ = [s["redis"]["cpu_s"] for s in inside if s["redis"]["cpu_s"] is not None]
        r["redis_cpu_pct"] = round(100 * (rc_[-1] - rc_[0]) / max(1e-9, inside[-1]["t_s"] - inside[0]["t_s"]), 1) \
            if len(rc_) > 1 else None
        r["redis_rss_kb"] = median(s["redis"]["rss_kb"] for s in inside)
    with open(os.path.join(outdir, "soak.json"), "w") as f:
        json.dump({"verdict": verdict, "params": params, "cluster": n, "seconds": seconds, "command": shown,
                   "node_exits": codes, "redis_exit": redis_exit, "rows": rows, "totals": lg.get("totals"),
                   "samples": samples}, f, indent=1)
    args.db = f"Redis (cluster of {n} nodes, --cluster-history-per-room {cap})"
    write_soak_report(outdir, args, params, shown, verdict, rows, lg, codes, seconds)
    append_cluster_section(outdir, n, verdict, rows, c, lg)
    log(f"soak --cluster {n} {'PASS' if verdict['pass'] else 'FAIL'} in {time.time() - t_begin:.0f} s; "
        f"{os.path.relpath(outdir, ROOT)}/soak.md")
    for p in problems[:12]:
        log(f"  {p}")
    return 0 if verdict["pass"] else 1


def lg_proc_wait(proc, seconds):
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def append_cluster_section(outdir, n, verdict, rows, c, lg):
    mib = lambda kb: f"{kb / 1024:.1f}" if kb is not None else "-"
    kill = verdict.get("kill") or {}
    rc = verdict.get("redis_check") or {}
    lo = verdict.get("losses") or {}
    md = ["", "## Cluster", "",
          f"- {n} nodes sharing one redis-server, every node and Redis pinned to the server core; loadgen "
          "(`soak --failover`) puts stable member i on node i % N and moves each churner to the next node "
          "every cycle (so a resume check's two visits are on two nodes).",
          f"- node {kill.get('node', '?')} killed with SIGKILL at t = {fmt(kill.get('t_kill_s'), 1)} s, back on "
          f"its port at t = {fmt(kill.get('t_up_s'), 1)} s (new pid {kill.get('new_pid', '-')}).",
          f"- losses loadgen saw: {lo.get('count', 0)} ({', '.join(f'{k}: {v}' for k, v in sorted((lo.get('by_kind') or {}).items())) or 'none'}), "
          f"from {fmt(lo.get('first_s_after_kill'), 2)} s to {fmt(lo.get('last_s_after_kill'), 2)} s after the kill; "
          f"outside the kill window: {lo.get('outside_window', 0)}.",
          f"- stable members lost with the node: {c.get('stable_lost', 0)}; back with `join since`: "
          f"{c.get('stable_rejoins', 0)} ({c.get('rejoin_replayed', 0):,} missed messages replayed, "
          f"{c.get('rejoin_failures', 0)} rejoins whose history was not exactly the missed ids); refused connects "
          f"while it was down: {c.get('refused_connects', 0)}.",
          f"- churner acks cut with the node (no answer, connection gone): {c.get('acks_cut', 0)}; resume checks cut: "
          f"{c.get('resume_cut', 0)}; steady messages unsure (sent on a lost connection without coming back, or due "
          f"while the sender was away): {c.get('steady_unsure', 0)}, of which missing from the sequences: "
          f"{c.get('seq_unsure_skipped', 0)} (per member).",
          f"- acked messages looked up in Redis at the end (`ZRANGE cb:h:ROOM 0 -1 WITHSCORES`, the stamp "
          f"compared): {rc.get('acked', 0):,} in {rc.get('rooms', 0)} rooms; missing {rc.get('missing', '-')}, "
          f"another message at the id {rc.get('wrong', '-')} ({rc.get('stored_messages', 0):,} messages stored; "
          f"`--cluster-history-per-room {verdict.get('history_per_room')}` keeps the whole run).", "",
          "RSS and fds per node, each phase on its own (after the kill the killed node's members are on the "
          "others, so the level moves; the restarted node is a new process):", "",
          "| node | phase | settled window s | settled RSS MiB | end window s | end RSS MiB | change | settled fds | end fds |",
          "|---:|---|---|---:|---|---:|---:|---:|---:|"]
    for v in verdict.get("nodes", []):
        md.append(f"| {v['node']} | {v['phase']} | "
                  f"{v['settled_window_s'][0]:g}–{v['settled_window_s'][1]:g} | {mib(v['settled_rss_kb'])} | "
                  f"{v['end_window_s'][0]:g}–{v['end_window_s'][1]:g} | {mib(v['end_rss_kb'])} | "
                  f"{v.get('rss_change_pct', 0):+.2f}% | {fmt(v['settled_fds'], 0)} | {fmt(v['end_fds'], 0)} |")
    md += ["", "| row | " + " | ".join(f"node {i} RSS MiB" for i in range(n)) + " | Redis RSS MiB | Redis CPU |",
           "|---:|" + "---:|" * (n + 2)]
    for r in rows:
        md.append(f"| {r['bucket']} | " + " | ".join(mib(x) for x in r["node_rss_kb"]) +
                  f" | {mib(r['redis_rss_kb'])} | {fmt(r['redis_cpu_pct'], 0)}% |")
    md += ["", "In the per-row table above, RSS and fds are the nodes' sums and *server CPU* the nodes' "
           "(the killed process's CPU kept); *connections* is node 0's own count (`/api/stats` of node 0, never killed). Redis RSS grows with the history it keeps for the whole run (`--cluster-history-per-room`).", ""]
    with open(os.path.join(outdir, "soak.md"), "a") as f:
        f.write("\n".join(md))
