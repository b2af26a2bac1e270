"""The load scenarios (fanout, rooms, idle, storm, joins): their sizes, one loadgen run per
target and scenario, each on a fresh server."""

import json
import os
import subprocess
import time

from .common import LOADGEN, free_port, log, pinned, shown

SCENARIOS = ["fanout", "rooms", "idle", "storm", "joins"]
# What a run does without --scenarios. `joins` here joins rooms with no stored history (it
# keeps the scenario working in the smoke run); `run --joins` is the cold-history measurement.
DEFAULT_SCENARIOS = ["fanout", "rooms", "idle", "storm"]
SMOKE_SCENARIOS = DEFAULT_SCENARIOS + ["joins"]
# `--cluster N`: the two measurements, each against a standalone node and the cluster.
CLUSTER_SCENARIOS = ["fanout", "rooms"]
CLUSTER_ROOMS_RATES = "5000,20000"

FULL = {
    "fanout": {"members": 1000, "senders": 10, "rates": "100,250,500,1000,1600,2500,4000,6000",
               "duration": 5, "drain": 3},
    "rooms": {"rooms": 1000, "room_size": 10, "rates": "5000,20000,50000", "duration": 5, "drain": 3},
    "idle": {"levels": "1000,2500,5000,10000,15000", "hold": 5},
    "storm": {"conns": 5000, "concurrency": 500},
    "joins": {"members": 1000, "senders": 10, "rates": "500", "duration": 10, "drain": 3,
              "joiners": 50, "join_rate": 20, "cold_rooms": 10000},
}
SMOKE = {
    "fanout": {"members": 20, "senders": 2, "rates": "100,200", "duration": 1.5, "drain": 1},
    "rooms": {"rooms": 10, "room_size": 5, "rates": "50,100", "duration": 1.5, "drain": 1},
    "idle": {"levels": "50,100", "hold": 1},
    "storm": {"conns": 200, "concurrency": 50},
    "joins": {"members": 20, "senders": 2, "rates": "100", "duration": 1.5, "drain": 1,
              "joiners": 4, "join_rate": 8, "cold_rooms": 100},
}


def loadgen_args(scenario, p):
    if scenario in ("fanout", "joins"):
        out = ["--members", p["members"], "--senders", p["senders"], "--rates", p["rates"],
               "--duration", p["duration"], "--drain", p["drain"]]
        if scenario == "joins":
            out += ["--joiners", p["joiners"], "--join-rate", p["join_rate"], "--cold-rooms", p["cold_rooms"]]
        return out
    if scenario == "rooms":
        return ["--rooms", p["rooms"], "--room-size", p["room_size"], "--rates", p["rates"],
                "--duration", p["duration"], "--drain", p["drain"]]
    if scenario == "idle":
        return ["--levels", p["levels"], "--hold", p["hold"]]
    return ["--conns", p["conns"], "--concurrency", p["concurrency"]]


def budget(scenario, p):
    if scenario in ("fanout", "rooms", "joins"):
        steps = len(str(p["rates"]).split(","))
        return 150 + steps * (float(p["duration"]) + float(p["drain"]) + 5)
    if scenario == "idle":
        return 240 + float(p["hold"])
    return 180


def run_one(target, scenario, params, outdir, args):
    t_begin = time.time()
    port = free_port()
    stem = f"{target.label}-{scenario}"
    logfile = os.path.join(outdir, "logs", f"{stem}.log")
    jsonfile = os.path.join(outdir, "raw", f"{stem}.json")
    record = {"target": target.label, "scenario": scenario, "ok": False, "problems": []}
    try:
        pids = target.start(port, logfile, args.server_core)
    except Exception as e:
        target.stop()
        record["problems"].append(str(e))
        return record
    secs = budget(scenario, params)
    cmd = [LOADGEN, scenario, "--target", target.addrs(port), "--proto", target.proto,
           "--path", target.path, "--src-ips", "8", "--label", target.label,
           "--server-pid", ",".join(map(str, pids)), "--out", jsonfile,
           "--max-seconds", str(int(secs))] + target.loadgen_extra()
    if target.tls:
        cmd += ["--tls-ca", target.tls[0]]
    if target.proto == "raw" and scenario in ("fanout", "rooms"):
        cmd += ["--self-delivery", "true" if target.self_delivery else "false"]
    if args.procs > 1:
        cmd += ["--procs", str(args.procs)]
    if args.quiet:
        cmd += ["--quiet"]
    cmd += [str(x) for x in loadgen_args(scenario, params)]
    record["command"] = shown(cmd)
    log(f"{target.label} / {scenario}: {' '.join(cmd[1:])}")
    try:
        if os.path.exists(jsonfile):
            os.remove(jsonfile)
        r = subprocess.run(pinned(args.gen_core, cmd), timeout=secs + 60)
        rc = r.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    alive = target.alive()
    code = target.stop()
    record["server_exit"] = code
    if os.path.exists(jsonfile):
        with open(jsonfile) as f:
            record["result"] = json.load(f)
        record["problems"] += record["result"].get("problems", [])
    if rc not in (0, 2):
        record["problems"].append(f"loadgen exit {rc}")
    if not alive:
        record["problems"].append(f"server died during the run (exit {code}), see {logfile}")
    record["ok"] = not record["problems"]
    record["seconds"] = round(time.time() - t_begin, 1)
    return record


def run_all(targets, scenarios, params, outdir, args, records):
    for t in targets:
        try:
            t.setup()
        except Exception as e:
            records.append({"target": t.label, "scenario": "setup", "ok": False, "problems": [str(e)]})
            continue
        for scen in scenarios:
            if scen in ("rooms", "joins") and t.proto == "raw":
                log(f"{t.label}: skipping {scen} (the raw peer protocol has no rooms)")
                continue
            rec = run_one(t, scen, params[scen], outdir, args)
            records.append(rec)
            status = f"ok ({rec.get('seconds', 0)} s)" if rec["ok"] else "PROBLEMS: " + "; ".join(rec["problems"][:4])
            log(f"{t.label} / {scen}: {status}{summary_line(rec)}")


def summary_line(rec):
    """The latencies of a finished run, for the progress log: per traffic step
    `rate: p50/p95/p99 ms`, for a storm the handshake's."""
    res = rec.get("result") or {}
    if res.get("steps"):
        return "; p50/p95/p99 ms " + ", ".join(
            f"{s['offered_rate']:g}/s {s['latency_ms']['p50']:.2f}/{s['latency_ms'].get('p95', 0):.2f}/"
            f"{s['latency_ms']['p99']:.2f}" for s in res["steps"])
    h = res.get("handshake_ms")
    if h:
        return (f"; {res.get('handshakes_per_sec', 0):g} handshakes/s, handshake p50/p95/p99 "
                f"{h['p50']:.2f}/{h.get('p95', 0):.2f}/{h['p99']:.2f} ms")
    return ""
