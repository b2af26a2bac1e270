"""`run --joins`: join latency under fan-out load, with history that is not in any cache.

One chatterbox on the SQLite store, serving a database that `benchmark/prefill` wrote just
before (ROOMS rooms with stored history), the OS page cache dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`, root only; the report says when that was not possible). Then two
loadgen runs on that server, one after the other:

1. `fanout` alone: the room of M members at R msg/s, the baseline of the broadcast latency;
2. `joins`: the same fan-out, plus J joiner connections that join rooms with cold history
   at X joins/s (each room once) and leave again: the `join` -> `history` latency, and the
   broadcast latency of the room's members while the joins happen.

If the loop stalls on a page read, the second run's broadcast p99 rises above the first
one's, and the join latency carries the read. To see the reads themselves, the event loop's
thread (the server's main thread) has its `pread64` calls counted with
`perf stat -e syscalls:sys_enter_pread64 -t TID` for a window inside each run's step: a loop
that reads no pages makes none.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from .common import BENCH, LOADGEN, StepWatch, build, chatterbox_bins, env_lines, fmt, free_port, log, pinned, shown
from .targets import Target

PREFILL = os.path.join(BENCH, "prefill")

JOINS_DEFAULTS = {"members": 1000, "senders": 10, "fanout_rate": 500, "joiners": 50, "rate": 20,
                  "rooms": 10000, "messages": 100, "duration": 20, "drain": 3}


def drop_caches():
    """Writes dirty pages and drops the page cache; False when not allowed (not root)."""
    try:
        subprocess.run(["sync"], timeout=120, check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def joins_params(args):
    p = dict(JOINS_DEFAULTS)
    for k in p:
        v = getattr(args, "joins_" + k, None)
        if v is not None:
            p[k] = v
    return p


def loadgen_cmd(scenario, port, pid, out, p, prefix, quiet):
    cmd = [LOADGEN, scenario, "--target", f"127.0.0.1:{port}", "--proto", "chatterbox",
           "--src-ips", "8", "--label", f"chatterbox-{scenario}", "--server-pid", pid,
           "--out", out, "--name-prefix", prefix, "--max-seconds", int(300 + 2 * p["duration"]),
           "--members", p["members"], "--senders", p["senders"], "--rates", p["fanout_rate"],
           "--duration", p["duration"], "--drain", p["drain"], "--no-early-stop"]
    if scenario == "joins":
        cmd += ["--joiners", p["joiners"], "--join-rate", p["rate"], "--cold-rooms", p["rooms"]]
    return [str(x) for x in cmd]


# The loop thread's calls counted during each run's step.
LOOP_CALLS = ["pread64", "preadv", "read", "fcntl", "fsync", "fdatasync"]


def count_loop_calls(tid, window):
    """The thread's LOOP_CALLS and all its syscalls over `window` s ({name: n}), None without perf."""
    if not shutil.which("perf"):
        return None
    events = [f"syscalls:sys_enter_{n}" for n in LOOP_CALLS
              if os.path.isdir(f"/sys/kernel/tracing/events/syscalls/sys_enter_{n}")] + ["raw_syscalls:sys_enter"]
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        r = subprocess.run(["perf", "stat", "-x,", "-o", out.name, "-e", ",".join(events), "-t", str(tid),
                            "--", "sleep", str(window)], capture_output=True, text=True, timeout=window + 60)
        counts = {}
        for line in out.read().splitlines():
            f = line.split(",")
            if len(f) >= 3 and f[0].isdigit():
                counts[f[2].replace("syscalls:sys_enter_", "").replace("raw_syscalls:sys_enter", "all")] = int(f[0])
        return counts if r.returncode == 0 else None


def run_loadgen(cmd, args, timeout, loop_tid, window):
    """Runs loadgen; while its step runs, counts the loop thread's calls for `window` s."""
    log(shown(cmd))
    lg = subprocess.Popen(pinned(args.gen_core, cmd), stderr=subprocess.PIPE, text=True)
    watch = StepWatch(lg.stderr, args.quiet)
    watch.start()
    calls = None
    try:
        if watch.started.wait(timeout=timeout) and lg.poll() is None:
            time.sleep(1.0)
            calls = count_loop_calls(loop_tid, window)
        rc = lg.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        lg.kill()
        lg.wait()
        rc = "timeout"
    watch.join(timeout=5)
    out = cmd[cmd.index("--out") + 1]
    res = None
    if os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
    return rc, res, calls


def step_row(name, res, calls, p):
    st = ((res or {}).get("steps") or [{}])[0]
    lat = st.get("latency_ms") or {}
    srv = st.get("server") or {}
    threads = ", ".join(f"{n} {t.get('cpu_s', 0):.2f}" for n, t in sorted((srv.get("threads") or {}).items()))
    loop = "-"
    if calls:
        w = calls.get("window_s") or 1
        loop = f"{calls.get('pread64', 0) / w:,.0f} / {calls.get('fcntl', 0) / w:,.0f} / {calls.get('all', 0) / w:,.0f}"
        if st.get("joins"):
            loop += f" ({calls.get('pread64', 0) / (w * float(p['rate'])):.1f} pread64 per join)"
    j = st.get("joins") or {}
    jl = j.get("latency_ms") or {}
    noise = "; ".join(st.get("noise") or []) + ("; loadgen-bound" if (st.get("generator") or {}).get("bottleneck") else "")
    return (f"| {name} | {fmt(st.get('deliveries_per_sec'), 0)} | {fmt(lat.get('p50'), 2)} | {fmt(lat.get('p95'), 2)} | "
            f"{fmt(lat.get('p99'), 2)} | {fmt(lat.get('max'), 2)} | {fmt(st.get('lost'), 0)} | "
            f"{fmt(j.get('sent'), 0) if j else '-'} | {fmt(j.get('answered'), 0) if j else '-'} | "
            f"{fmt(j.get('skipped'), 0) if j else '-'} | "
            f"{fmt(jl.get('p50'), 2)} | {fmt(jl.get('p95'), 2)} | {fmt(jl.get('p99'), 2)} | {fmt(jl.get('max'), 2)} | "
            f"{fmt(100 * srv['cpu_frac_of_core'], 0) + '%' if srv else '-'} | {threads or '-'} | {loop} | "
            f"{noise.strip('; ') or '-'} |")


def write_joins_report(outdir, args, p, info, runs):
    md = ["# chatterbox: join latency under fan-out, cold history", ""]
    md += env_lines(args)
    if info.get("store") == "memory":
        md += ["- store: memory: the joined rooms have no stored history (what a join costs without a read)"]
    else:
        md += [f"- store: sqlite; database {info.get('db_mib')} MiB ({p['rooms']} rooms x {p['messages']} "
               f"messages, written by `benchmark/prefill` in {info.get('fill_s')} s)"]
    md += [
           f"- page cache dropped before the server started and before the joins run: "
           f"{'yes' if info.get('dropped') else 'NO (not root): reads may come from the page cache'}",
           f"- load: one room of {p['members']} members, {p['senders']} senders, {p['fanout_rate']:g} msg/s "
           f"({int(p['members'] * p['fanout_rate']):,} deliveries/s) for {p['duration']:g} s; "
           f"joins run: {p['joiners']} joiners, {p['rate']:g} joins/s, each to a room not joined before, "
           f"then `leave`", ""]
    md += ["| run | deliveries/s | broadcast p50 ms | p95 ms | p99 ms | max ms | lost | joins | answered | skipped | "
           "join→history p50 ms | p95 ms | p99 ms | max ms | server CPU | CPU s per thread | "
           "event loop thread: pread64 / fcntl / all syscalls per s | notes |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for name, r in runs:
        md.append(step_row(name, r["result"], r.get("loop_calls"), p))
    md += ["", "Broadcast latency: intended send time to arrival at each of the room's members (open loop). "
           "Join latency: the joiner's `join` written to its `history` read. *Event loop thread*: the "
           "server's main thread, its calls counted with `perf stat -t` for a window inside the step "
           "(a page read on the loop shows as `pread64`; SQLite's locks as `fcntl`).", ""]
    problems = [f"{name}: {x}" for name, r in runs for x in r["problems"]]
    if problems:
        md += ["Problems:", ""] + [f"- {x}" for x in problems[:20]] + [""]
    md += ["## Commands", ""] + [f"- {name}: `{r['command']}`" for name, r in runs] + [""]
    with open(os.path.join(outdir, "joins.md"), "w") as f:
        f.write("\n".join(md))


def run_joins(args):
    p = joins_params(args)
    store = args.db or "sqlite"
    if store not in ("sqlite", "memory"):
        sys.exit("--joins runs one store: --db sqlite (default) or --db memory (no stored history)")
    outdir = os.path.abspath(args.out or os.path.join(BENCH, "results", "joins"))
    os.makedirs(outdir, exist_ok=True)
    build(args.no_build)
    env_lines(args)
    runs, info = [], {}
    for tag, path in chatterbox_bins(args):
        info = joins_one(Target("chatterbox", store, path, tag), store, p, args, outdir, runs)
    with open(os.path.join(outdir, "joins.json"), "w") as f:
        json.dump({"params": p, "info": info, "runs": [{"name": n, **r} for n, r in runs]}, f, indent=1)
    write_joins_report(outdir, args, p, info, runs)
    bad = [x for _, r in runs for x in r["problems"]]
    log(f"joins: {'clean' if not bad else 'PROBLEMS'}; {os.path.relpath(outdir)}/joins.md")
    for x in bad[:10]:
        log(f"  {x}")
    return 1 if bad or len(runs) < 2 * len(chatterbox_bins(args)) else 0


def joins_one(target, store, p, args, outdir, runs):
    """Prefill, drop the cache, one server, the two loadgen runs (appended to `runs`)."""
    tmp = tempfile.mkdtemp(prefix="chatterbox-joins-", dir=args.joins_dir)
    info = {"store": store, "db_mib": 0, "fill_s": 0, "dropped": False}
    who = target.label
    try:
        if store == "sqlite":
            db = os.path.join(tmp, "cold.db")
            t = time.time()
            subprocess.run([sys.executable, PREFILL, db, "--rooms", str(p["rooms"]),
                            "--messages", str(p["messages"])], check=True, timeout=3600)
            info["fill_s"] = round(time.time() - t, 1)
            info["db_mib"] = round(os.path.getsize(db) / 2**20, 1)
            target.db_path = db
        info["dropped"] = drop_caches()
        if not info["dropped"]:
            log("cannot drop the page cache (not root): history reads may be warm")
        port = free_port()
        pids = target.start(port, os.path.join(outdir, f"{who}.log"), args.server_core)
        pid = ",".join(map(str, pids))
        budget = 360 + 2 * float(p["duration"])
        for name, scen, prefix in (("fan-out alone", "fanout", "b"), ("fan-out + joins", "joins", "j")):
            if scen == "joins" and info["dropped"]:
                drop_caches()
            out = os.path.join(outdir, f"{who}-{scen}.json")
            if os.path.exists(out):
                os.remove(out)
            cmd = loadgen_cmd(scen, port, pid, out, p, prefix, args.quiet)
            window = max(1.0, float(p["duration"]) - 3)
            rc, res, calls = run_loadgen(cmd, args, budget, pids[0], window)
            if calls is not None:
                calls["window_s"] = window
            problems = list((res or {}).get("problems", []))
            if rc not in (0, 2):
                problems.append(f"loadgen exit {rc}")
            runs.append((f"{who}: {name}", {"command": shown(cmd), "result": res, "problems": problems,
                                            "loop_calls": calls}))
            if not target.alive():
                break
        alive = target.alive()
        code = target.stop()
        if not alive:
            runs[-1][1]["problems"].append(f"the server died (exit {code}), see {who}.log")
    except Exception as e:
        runs.append((f"{who}: setup", {"command": "-", "result": None, "problems": [str(e)]}))
    finally:
        target.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return info
