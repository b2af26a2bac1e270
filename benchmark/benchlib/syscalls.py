"""`run --syscalls`: the server's system calls per delivery under fan-out, by kind.

For each target (default chatterbox and bun) a fresh server, pinned to its core, gets the
`fanout` load (one room of M members, S senders, R msg/s: M x R deliveries/s). Once the
traffic step is running, the server's system calls are counted for W seconds, with
`perf stat -e 'syscalls:sys_enter_*' -p PIDS` (kernel tracepoints: counts without stopping
the process) or, with `--syscalls-tool strace`, `strace -c -f -p PID` (ptrace: slows every
call down, so batching can differ; use it where perf is missing). The deliveries in the
window are the offered rate x W (loadgen checks that none was lost); the
kernel's count of `sendto`/`writev` calls shows the same number when each delivery is one
write. Bun is set up (npm) by its `setup` the first time, outside any count.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .common import BENCH, LOADGEN, StepWatch, build, chatterbox_bins, env_lines, fmt, free_port, log, pinned, shown
from .cluster import ClusterTarget
from .targets import Target

SYSCALLS_DEFAULTS = {"members": 1000, "senders": 10, "rate": 50, "window": 10}

# How the table groups the calls.
KINDS = [
    ("write", ("write", "writev", "sendto", "sendmsg", "sendmmsg")),
    ("wait", ("epoll_wait", "epoll_pwait", "epoll_pwait2", "poll", "ppoll", "select", "pselect6",
              "io_uring_enter")),
    ("read", ("read", "readv", "recvfrom", "recvmsg", "recvmmsg")),
    ("epoll_ctl", ("epoll_ctl",)),
    ("futex", ("futex",)),
]


# Counted one by one with perf (one tracepoint each: a glob over all ~350 makes perf's
# set-up take seconds); everything else is the total (raw_syscalls:sys_enter) minus these.
NAMED = sorted({n for _, names in KINDS for n in names} | {
    "madvise", "mmap", "munmap", "mprotect", "brk", "accept4", "close", "shutdown", "getrandom",
    "clock_gettime", "clock_nanosleep", "nanosleep", "timerfd_settime", "sched_yield", "eventfd2",
    "fdatasync", "fsync", "pwrite64", "pread64", "rt_sigprocmask", "setsockopt", "getsockopt",
    "ioctl", "fcntl", "openat", "newfstatat", "statx", "lseek", "getpid", "gettid", "tgkill"})
TRACEFS = "/sys/kernel/tracing/events/syscalls"


def perf_events():
    have = [n for n in NAMED if os.path.isdir(os.path.join(TRACEFS, f"sys_enter_{n}"))]
    if not have:  # tracefs not mounted where we look: let perf resolve a glob
        return "syscalls:sys_enter_*"
    return ",".join([f"syscalls:sys_enter_{n}" for n in have] + ["raw_syscalls:sys_enter"])


def kind_of(name):
    for kind, names in KINDS:
        if name in names:
            return kind
    return "other"


def parse_perf(text):
    """`perf stat -x,` output -> {syscall: count}."""
    counts, total = {}, None
    for line in text.splitlines():
        parts = line.split(",")
        if len(parts) < 3:
            continue
        try:
            n = int(parts[0])
        except ValueError:
            continue  # <not counted>, <not supported>
        if parts[2] == "raw_syscalls:sys_enter":
            total = n
        elif parts[2].startswith("syscalls:sys_enter_") and n:
            counts[parts[2][len("syscalls:sys_enter_"):]] = n
    if total is not None and total > sum(counts.values()):
        counts["(others)"] = total - sum(counts.values())
    return counts


def parse_strace(text):
    """`strace -c` summary -> {syscall: calls}."""
    counts = {}
    for line in text.splitlines():
        t = line.split()
        if len(t) < 5 or t[-1] == "total" or not re.match(r"^[\d.]+$", t[0]):
            continue
        try:
            counts[t[-1]] = int(t[3])
        except ValueError:
            continue
    return counts


def count_syscalls(tool, pids, window):
    """Counts the pids' system calls for `window` seconds: ({syscall: n}, error or None)."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        if tool == "perf":
            r = subprocess.run(["perf", "stat", "-x,", "-o", out.name, "-e", perf_events(),
                                "-p", ",".join(map(str, pids)), "--", "sleep", str(window)],
                               capture_output=True, text=True, timeout=window + 60)
            text = out.read()
            counts = parse_perf(text)
            if r.returncode != 0 or not counts:
                return counts, f"perf failed ({r.returncode}): {(r.stderr or text).strip()[-300:]}"
            return counts, None
        cmd = ["strace", "-c", "-f", "-o", out.name]
        for p in pids:
            cmd += ["-p", str(p)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(window)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        counts = parse_strace(out.read())
        return counts, None if counts else f"strace failed: {err.strip()[-300:]}"


def measure(target, p, args, outdir):
    rec = {"target": target.label, "problems": []}
    try:
        target.setup()
        port = free_port()
        pids = target.start(port, os.path.join(outdir, f"{target.label}.log"), args.server_core)
    except Exception as e:
        target.stop()
        rec["problems"].append(str(e))
        return rec
    window = float(p["window"])
    duration = window + 10  # the count starts ~3 s into the step and perf needs ~1-2 s around it
    out = os.path.join(outdir, f"{target.label}-fanout.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [LOADGEN, "fanout", "--target", target.addrs(port), "--proto", target.proto,
           "--path", target.path, "--src-ips", "8", "--label", target.label,
           "--server-pid", ",".join(map(str, pids)), "--out", out, "--max-seconds", str(int(300 + duration)),
           "--members", str(p["members"]), "--senders", str(p["senders"]), "--rates", str(p["rate"]),
           "--duration", str(duration), "--drain", "3"] + target.loadgen_extra()
    if target.proto == "raw":
        cmd += ["--self-delivery", "true" if target.self_delivery else "false"]
    rec["command"] = shown(cmd)
    log(f"{target.label}: {rec['command']}")
    lg = subprocess.Popen(pinned(args.gen_core, cmd), stderr=subprocess.PIPE, text=True)
    watch = StepWatch(lg.stderr, args.quiet)
    watch.start()
    try:
        if not watch.started.wait(timeout=300):
            rec["problems"].append("the traffic step did not start within 300 s")
        else:
            time.sleep(1.5)  # into the steady part of the step
            t0 = time.monotonic()
            counts, err = count_syscalls(args.syscalls_tool, pids, window)
            elapsed = time.monotonic() - t0
            if err:
                rec["problems"].append(err)
            if lg.poll() is not None or elapsed > duration - 3:
                rec["problems"].append(f"the count took {elapsed:.1f} s and may have outlasted the traffic")
            receivers = p["members"] if target.self_delivery else p["members"] - 1
            rec.update({
                "count_wall_s": round(elapsed, 2), "counts": counts,
                "deliveries": int(p["rate"] * receivers * window),
            })
        rc = lg.wait(timeout=300 + duration + 60)
    except subprocess.TimeoutExpired:
        lg.kill()
        rc = "timeout"
    watch.join(timeout=5)
    alive = target.alive()
    code = target.stop()
    if os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
        rec["problems"] += res.get("problems", [])
        st = (res.get("steps") or [{}])[0]
        rec["lost"] = st.get("lost")
        rec["latency_ms"] = st.get("latency_ms")
        rec["server"] = st.get("server")
    if rc not in (0, 2):
        rec["problems"].append(f"loadgen exit {rc}")
    if not alive:
        rec["problems"].append(f"server died during the run (exit {code})")
    return rec


def per(n, d):
    return f"{n / d:.3f}" if d else "-"


def write_syscalls_report(outdir, args, p, recs):
    md = ["# Server system calls per delivery, fan-out", ""]
    md += env_lines(args)
    md += [f"- load: one room of {p['members']} members, {p['senders']} senders, {p['rate']:g} msg/s "
           f"({int(p['members'] * p['rate']):,} deliveries/s); counted for {p['window']:g} s inside the step with "
           f"`{'perf stat -e syscalls:sys_enter_*' if args.syscalls_tool == 'perf' else 'strace -c -f'} -p PID`", ""]
    kinds = [k for k, _ in KINDS] + ["other"]
    md += ["| target | deliveries | syscalls | per delivery | " + " | ".join(kinds) + " | server CPU s / M deliveries |",
           "|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|"]
    for r in recs:
        c, d = r.get("counts") or {}, r.get("deliveries") or 0
        by = {k: 0 for k in kinds}
        for name, n in c.items():
            by[kind_of(name)] += n
        total = sum(c.values())
        cpu = (r.get("server") or {}).get("cpu_s_per_million_deliveries")
        md.append(f"| {r['target']} | {fmt(d, 0)} | {fmt(total, 0)} | {per(total, d)} | "
                  + " | ".join(per(by[k], d) for k in kinds) + f" | {fmt(cpu, 2)} |")
    md += ["", "Per-delivery columns: calls of that kind divided by the deliveries in the window. *write*: "
           "write, writev, sendto, sendmsg; *wait*: epoll_wait/epoll_pwait/poll/io_uring_enter; *read*: read, "
           "readv, recvfrom, recvmsg. *server CPU s / M deliveries* is over loadgen's whole step "
           "(the count included, so with strace it is inflated).", ""]
    for r in recs:
        md += [f"## {r['target']}", ""]
        lat = r.get("latency_ms") or {}
        if lat:
            md += [f"Step latency p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, p99 {lat.get('p99')} ms; "
                   f"lost {r.get('lost')}.", ""]
        c, d = r.get("counts") or {}, r.get("deliveries") or 0
        if c:
            md += ["| syscall | calls | per delivery |", "|---|---:|---:|"]
            for name, n in sorted(c.items(), key=lambda kv: -kv[1])[:15]:
                md.append(f"| {name} | {fmt(n, 0)} | {per(n, d)} |")
            md.append("")
        if r["problems"]:
            md += ["Problems: " + "; ".join(r["problems"][:8]), ""]
        md += [f"Command: `{r.get('command', '(did not start)')}`", ""]
    with open(os.path.join(outdir, "syscalls.md"), "w") as f:
        f.write("\n".join(md))


def run_syscalls(args):
    p = dict(SYSCALLS_DEFAULTS)
    for k in p:
        v = getattr(args, "syscalls_" + k, None)
        if v is not None:
            p[k] = v
    tool = args.syscalls_tool
    if args.db == "both":
        sys.exit("--syscalls runs one store: --db memory (default) or --db sqlite")
    if not shutil.which(tool):
        sys.exit(f"--syscalls needs {tool} (apt-get install {'linux-perf' if tool == 'perf' else 'strace'})")
    outdir = os.path.abspath(args.out or os.path.join(BENCH, "results", "syscalls"))
    os.makedirs(outdir, exist_ok=True)
    build(args.no_build, cluster=bool(getattr(args, "cluster", None)))
    env_lines(args)
    default = "chatterbox" if getattr(args, "cluster", None) else "chatterbox,bun"
    names = [t for t in (args.targets or default).split(",") if t]
    targets = []
    for name in names:
        if name == "chatterbox":
            targets += [Target(name, args.db or "memory", path, tag) for tag, path in chatterbox_bins(args)]
            if getattr(args, "cluster", None):
                # The nodes' calls, summed (Redis is not counted).
                targets += [ClusterTarget(args.cluster, path, tag) for tag, path in chatterbox_bins(args)]
        else:
            targets.append(Target(name, "n/a"))
    recs = []
    for target in targets:
        try:
            recs.append(measure(target, p, args, outdir))
        except KeyboardInterrupt:
            target.stop()
            return 130
        finally:
            target.stop()
        r = recs[-1]
        total = sum((r.get("counts") or {}).values())
        log(f"{r['target']}: {total} syscalls for {r.get('deliveries', 0)} deliveries"
            + (f"; PROBLEMS: {'; '.join(r['problems'][:4])}" if r["problems"] else ""))
    with open(os.path.join(outdir, "syscalls.json"), "w") as f:
        json.dump({"params": p, "tool": tool, "records": recs}, f, indent=1)
    write_syscalls_report(outdir, args, p, recs)
    log(f"syscalls: {os.path.relpath(outdir)}/syscalls.md")
    return 1 if any(r["problems"] for r in recs) else 0
