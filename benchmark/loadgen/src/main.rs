//! `loadgen`: an open-loop WebSocket load generator for chatterbox and for peer servers that
//! relay raw text frames. See `loadgen help`.
//!
//! # Layout
//! - `args`: the small command-line parser.
//! - `clock`: the shared monotonic clock, CPU time, /proc samples of the server.
//! - `ws`: the client transport (mio, shared read buffer, frame codec, timerfd).
//! - `proto`: payload stamps and the bits of chatterbox's event format we read.
//! - `traffic`: `fanout` and `rooms`; `conns`: `idle` and `storm`; `soak`: the long run.
//! - `coord`: worker processes and barriers; `report`: raw results; `summary`: merging them
//!   into the JSON report.

mod args;
mod clock;
mod conns;
mod coord;
mod proto;
mod redisinfo;
mod report;
mod soak;
mod summary;
mod tls;
mod traffic;
mod ws;

use std::net::{Ipv4Addr, SocketAddrV4};

use serde_json::{Value, json};

use args::Args;
use clock::mono_ns;
use coord::{Coord, Ctx, Sampler};
use proto::Proto;
use report::ShardResult;

const HELP: &str = "\
loadgen SCENARIO --target 127.0.0.1:PORT[,127.0.0.1:PORT2..] [options]

Scenarios
  fanout   one room of --members M, --senders S of them send; sweep --rates (messages/s)
  rooms    --rooms R rooms of --room-size N members (each in --rooms-per-member rooms);
           --senders S (default: every member) send to their rooms; sweep --rates
  idle     open --levels L1,L2,.. connections (or --conns N), sample the server at each
           level, hold --hold seconds
  storm    open --conns N connections as fast as possible, at most --concurrency in flight
  joins    fanout (defaults: --members 1000, --rates 500) plus --joiners J members that join
           rooms with stored history (--cold-rooms R named --cold-prefix P: P0 .. P{R-1},
           filled beforehand, e.g. by benchmark/prefill) at --join-rate X joins/s during
           each step, each room once; reports join -> history latency per step
  soak     chatterbox only, one process: --seconds S of steady traffic to --rooms R rooms of
           --room-size N stable members with churn, checking every per-room id (see below)

Common
  --target ADDR[,ADDR..] server address(es), loopback only (127.0.0.0/8); with several
                         (the nodes of a cluster; --addrs is the same option) connection i
                         goes to address i % n, round-robin
  --proto P              chatterbox (default) | raw (peer: every text frame relayed to all)
  --path P               upgrade path (default /ws); chatterbox adds ?name=PREFIXidx
  --name-prefix S        member name prefix (default lg<pid>_)
  --src-ips N            bind sources 127.0.0.1..127.0.0.N round-robin (default 1)
  --procs N              N worker processes share the connections (fd limit ~19,900 each)
  --server-pid P[,P..]   sample CPU (utime+stime) and RSS of these pids at each barrier
                         (summed: the nodes of a cluster are one server)
  --redis-pid P          a cluster's Redis: its CPU at each barrier, reported apart
  --redis ADDR           a cluster's Redis: INFO total_commands_processed at each barrier
                         (a step reports Redis commands per message)
  --label S              free text copied into the result (e.g. the target's name)
  --tls-ca PATH          speak TLS (wss://), trusting the PEM certificate(s) in PATH
  --out FILE             write the JSON result there (default: stdout)
  --max-seconds S        hard budget for the whole run (default 600)
  --concurrency C        handshakes in flight at once (default 200)
  --quiet                no progress lines on stderr

Traffic (fanout, rooms)
  --rates R1,R2,..       offered messages/s, one step each      --duration S   per step (5)
  --drain S              wait for deliveries after a step (3)    --msg-size B   payload (64)
  --slo-ms X             p99 bound for the best-rate answer (50)
  --no-early-stop        run every rate even after a step overloaded the server (late or
                         lost deliveries, or p99 > 10 x SLO); a lone process stops by default
  --room NAME            fanout room (default bench)
  --self-delivery B      raw proto: does the sender get its own frame (default true)
  --setup-timeout S      connect + join (default 120)
Joins (besides the fanout options)
  --joiners J            joiner connections, at most one join waiting each (default 50)
  --join-rate X          joins per second during each step (default 20)
  --cold-rooms R         rooms with stored history (default 10000)
  --cold-prefix P        their name prefix (default cold)
Soak (defaults in brackets)
  --seconds S            length of the traffic [600]
  --rooms R              rooms [20]                    --room-size N  stable members each [25]
  --senders-per-room K   steady senders per room [2]   --rate X       total steady msg/s [500]
  --churners C           churning clients at once [50] --dwell S      mean connected time per
                         churn cycle [10]              --churn-msgs M acked messages per cycle, 1..M [4]
  --resume-every S       one reconnect-with-`since` check every S seconds [10]
  --ack-timeout S        an ack later than this is missing [10]
  --drain S              after the schedule, wait at most S for everything to arrive [30]
  --bucket S             counters per S seconds in the result [60]
  --seed N               RNG seed [1]                  --msg-size B   payload [64]
  --setup-timeout S      connect + join of the stable members [120]
  --failover             a cluster node may die during the run: a lost connection or a
                         refused connect is a loss (timed, per address) and not a problem;
                         stable members come back on another address with `join since`,
                         churners' cut acks are not missing (see soak.rs)
Connections (idle, storm)
  --timeout S            one connection's welcome timeout (default 10)
  --hold S               idle: hold time at the top level (default 5)

Exit status: 0 ok, 2 the run finished with problems (gaps, duplicates, losses, errors,
failures, zero deliveries), 1 the run could not be done.
";

struct Common {
    proto: Proto,
    targets: Vec<SocketAddrV4>,
    srcs: Vec<Ipv4Addr>,
    path: String,
    name_prefix: String,
    concurrency: u32,
    label: String,
}

fn parse_common(a: &Args) -> Result<Common, String> {
    let list = match (a.opt_str("target"), a.opt_str("addrs")) {
        (Some(_), Some(_)) => return Err("give --target or --addrs, not both".into()),
        (Some(l), None) | (None, Some(l)) => l,
        (None, None) => return Err("--target 127.0.0.1:PORT is required".into()),
    };
    let targets = ws::parse_targets(&list).map_err(|e| format!("--target: {e}"))?;
    if let Some(ca) = a.opt_str("tls-ca") {
        tls::init(&ca)?;
    }
    let n_src: u32 = a.get("src-ips", 1)?;
    if !(1..=250).contains(&n_src) {
        return Err("--src-ips must be 1..250".into());
    }
    Ok(Common {
        proto: Proto::parse(&a.str_or("proto", "chatterbox"))?,
        targets,
        srcs: (1..=n_src)
            .map(|i| Ipv4Addr::new(127, 0, 0, i as u8))
            .collect(),
        path: a.str_or("path", "/ws"),
        name_prefix: a
            .opt_str("name-prefix")
            .unwrap_or_else(|| format!("lg{}_", std::process::id())),
        concurrency: a.get("concurrency", 200u32)?.max(1),
        label: a.str_or("label", ""),
    })
}

enum Plan {
    Traffic(traffic::TrafficCfg, f64),
    Idle(conns::ConnCfg, Vec<u32>, f64),
    Storm(conns::ConnCfg, u32),
}

fn parse_plan(scenario: &str, a: &Args, c: &Common) -> Result<(Plan, Value), String> {
    match scenario {
        "fanout" | "rooms" | "joins" => parse_traffic(scenario, a, c),
        "idle" | "storm" => parse_conns(scenario, a, c),
        other => Err(format!("unknown scenario '{other}' (see `loadgen help`)")),
    }
}

/// `fanout`, `rooms` and `joins`: the topology, the sweep, the joiners.
fn parse_traffic(scenario: &str, a: &Args, c: &Common) -> Result<(Plan, Value), String> {
    let fan = scenario != "rooms";
    let (rooms, room_size, rpm, senders) = if fan {
        let m: u32 = a.get("members", 1000)?;
        (1, m, 1, a.get("senders", 10u32)?)
    } else {
        let rooms: u32 = a.get("rooms", 1000)?;
        let size: u32 = a.get("room-size", 10)?;
        (
            rooms,
            size,
            a.get("rooms-per-member", 1u32)?,
            a.get("senders", rooms * size)?,
        )
    };
    if c.proto == Proto::Raw && rooms != 1 {
        return Err("the raw protocol has no rooms: use fanout".into());
    }
    if rooms == 0 || room_size == 0 || rooms as u64 * room_size as u64 > 200_000 {
        return Err("members must be 1..200000".into());
    }
    let default_rates: &[f64] = if scenario == "joins" {
        &[500.0]
    } else {
        &[500.0, 1000.0, 1500.0]
    };
    let rates: Vec<f64> = a.list("rates", default_rates)?;
    if rates.is_empty() || rates.iter().any(|&r| !(r > 0.0 && r <= 2_000_000.0)) {
        return Err("--rates must be in (0, 2e6]".into());
    }
    let duration: f64 = a.get("duration", 5.0)?;
    let drain: f64 = a.get("drain", 3.0)?;
    if !(0.1..=120.0).contains(&duration) || !(0.0..=60.0).contains(&drain) {
        return Err("--duration must be 0.1..120 s and --drain 0..60 s".into());
    }
    let msg_size: usize = a.get("msg-size", 64)?;
    let room = a.str_or("room", "bench");
    let room_names = if fan {
        vec![room]
    } else {
        (0..rooms).map(|i| format!("r{i}")).collect()
    };
    let slo: f64 = a.get("slo-ms", 50.0)?;
    let self_delivery: bool = a.get("self-delivery", true)?;
    let joins = if scenario == "joins" {
        Some(parse_joins(a, c)?)
    } else {
        None
    };
    let mut params = json!({});
    if let Some(j) = &joins {
        params = json!({"joiners": j.joiners, "join_rate": j.rate,
                        "cold_rooms": j.rooms, "cold_prefix": j.prefix});
    }
    let cfg = traffic::TrafficCfg {
        scenario: match scenario {
            "fanout" => "fanout",
            "rooms" => "rooms",
            _ => "joins",
        },
        proto: c.proto,
        targets: c.targets.clone(),
        srcs: c.srcs.clone(),
        path: c.path.clone(),
        name_prefix: c.name_prefix.clone(),
        rooms,
        room_size,
        rooms_per_member: rpm.max(1),
        senders,
        rates: rates.clone(),
        duration,
        drain,
        msg_size: msg_size.clamp(24, 900),
        concurrency: c.concurrency,
        self_delivery: c.proto == Proto::Chatterbox || self_delivery,
        setup_timeout: a.get("setup-timeout", 120.0)?,
        room_names,
        max_pending: 64 << 20,
        stop_p99_ms: if a.flag("no-early-stop") {
            0.0
        } else {
            10.0 * slo
        },
        joins,
    };
    let base = json!({
        "rooms": rooms, "room_size": room_size, "members": rooms * room_size,
        "rooms_per_member": rpm, "senders": cfg.senders.min(rooms * room_size),
        "rates": rates, "duration_s": duration, "drain_s": drain, "msg_size": cfg.msg_size,
        "self_delivery": cfg.self_delivery, "slo_ms": slo,
    });
    if let (Value::Object(p), Value::Object(b)) = (&mut params, base) {
        p.extend(b);
    }
    Ok((Plan::Traffic(cfg, slo), params))
}

/// `idle` and `storm`: how many connections, in which levels, held how long.
fn parse_conns(scenario: &str, a: &Args, c: &Common) -> Result<(Plan, Value), String> {
    let cfg = conns::ConnCfg {
        proto: c.proto,
        targets: c.targets.clone(),
        srcs: c.srcs.clone(),
        path: c.path.clone(),
        name_prefix: c.name_prefix.clone(),
        concurrency: c.concurrency,
        timeout: a.get("timeout", 10.0)?,
    };
    let n: u32 = a.get("conns", 1000)?;
    if n > 1_000_000 {
        return Err("--conns at most 1,000,000".into());
    }
    if scenario == "idle" {
        let mut levels: Vec<u32> = a.list("levels", &[n])?;
        levels.sort_unstable();
        levels.dedup();
        levels.retain(|&l| l > 0);
        let hold: f64 = a.get("hold", 5.0)?;
        if !(0.0..=3600.0).contains(&hold) {
            return Err("--hold must be 0..3600 s".into());
        }
        let params = json!({"levels": levels, "hold_s": hold, "concurrency": c.concurrency});
        Ok((Plan::Idle(cfg, levels, hold), params))
    } else {
        let params = json!({"conns": n, "concurrency": c.concurrency, "timeout_s": cfg.timeout});
        Ok((Plan::Storm(cfg, n), params))
    }
}

fn parse_joins(a: &Args, c: &Common) -> Result<traffic::JoinCfg, String> {
    if c.proto != Proto::Chatterbox {
        return Err("joins needs --proto chatterbox (it joins rooms)".into());
    }
    let joiners: u32 = a.get("joiners", 50)?;
    let rate: f64 = a.get("join-rate", 20.0)?;
    let rooms: u32 = a.get("cold-rooms", 10_000)?;
    let prefix = a.str_or("cold-prefix", "cold");
    if !(1..=10_000).contains(&joiners) {
        return Err("--joiners must be 1..10000".into());
    }
    if !(rate > 0.0 && rate <= 100_000.0) {
        return Err("--join-rate must be in (0, 100000]".into());
    }
    if rooms == 0 || prefix.is_empty() || prefix.len() > 50 {
        return Err("--cold-rooms must be at least 1 and --cold-prefix 1..50 characters".into());
    }
    Ok(traffic::JoinCfg {
        joiners,
        rate,
        rooms,
        prefix,
    })
}

fn run_shard(plan: &Plan, ctx: &mut Ctx) -> ShardResult {
    let r = match plan {
        Plan::Traffic(cfg, _) => traffic::run(cfg, ctx).map(ShardResult::Traffic),
        Plan::Idle(cfg, levels, hold) => {
            conns::run_idle(cfg, levels, *hold, ctx).map(ShardResult::Idle)
        }
        Plan::Storm(cfg, n) => conns::run_storm(cfg, *n, ctx).map(ShardResult::Storm),
    };
    r.unwrap_or_else(ShardResult::Error)
}

fn run_soak(a: &Args, c: &Common) -> Result<i32, String> {
    if c.proto != Proto::Chatterbox {
        return Err("soak needs --proto chatterbox (it checks rooms, ids and acks)".into());
    }
    if a.get("procs", 1u32)? != 1 {
        return Err("soak runs in one process (--procs 1)".into());
    }
    let seconds: f64 = a.get("seconds", 600.0)?;
    let rooms: u32 = a.get("rooms", 20)?;
    let room_size: u32 = a.get("room-size", 25)?;
    let rate: f64 = a.get("rate", 500.0)?;
    if !(1.0..=7200.0).contains(&seconds) {
        return Err("--seconds must be 1..7200".into());
    }
    if !(1..=1000).contains(&rooms)
        || !(1..=1000).contains(&room_size)
        || rooms * room_size > 15_000
    {
        return Err("--rooms and --room-size 1..1000, at most 15,000 stable members".into());
    }
    if !(rate > 0.0 && rate <= 100_000.0) {
        return Err("--rate must be in (0, 100000]".into());
    }
    let max_seconds: f64 = a.get("max-seconds", seconds + 300.0)?;
    let cfg = soak::SoakCfg {
        targets: c.targets.clone(),
        srcs: c.srcs.clone(),
        path: c.path.clone(),
        name_prefix: c.name_prefix.clone(),
        concurrency: c.concurrency,
        rooms,
        room_size,
        senders_per_room: a.get::<u32>("senders-per-room", 2)?.clamp(1, room_size),
        rate,
        seconds,
        churners: a.get::<u32>("churners", 50)?.min(2000),
        dwell: a.get::<f64>("dwell", 10.0)?.clamp(0.05, 600.0),
        churn_msgs: a.get::<u32>("churn-msgs", 4)?.clamp(1, 100),
        resume_every: a.get::<f64>("resume-every", 10.0)?.max(1.0),
        ack_timeout: a.get::<f64>("ack-timeout", 10.0)?.clamp(0.1, 120.0),
        drain: a.get::<f64>("drain", 30.0)?.clamp(1.0, 300.0),
        msg_size: a.get::<usize>("msg-size", 64)?.clamp(40, 900),
        bucket: a.get::<f64>("bucket", 60.0)?.clamp(1.0, 3600.0),
        seed: a.get("seed", 1u64)?,
        setup_timeout: a.get("setup-timeout", 120.0)?,
        deadline: mono_ns() + (max_seconds.clamp(1.0, 8000.0) * 1e9) as u64,
        quiet: a.flag("quiet"),
        failover: a.flag("failover"),
    };
    let out = a.opt_str("out");
    let _: Vec<u32> = a.list("server-pid", &[])?;
    a.finish()?;
    let t_start = mono_ns();
    let mut doc = json!({
        "scenario": "soak",
        "label": c.label,
        "proto": "chatterbox",
        "target": targets_str(&c.targets),
        "targets": c.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "params": cfg.params(),
    });
    let (code, problems) = match soak::run(&cfg) {
        Ok((body, problems)) => {
            if let (Value::Object(d), Value::Object(b)) = (&mut doc, body) {
                d.extend(b);
            }
            let code = if problems.is_empty() { 0 } else { 2 };
            (code, problems)
        }
        Err(e) => {
            doc["error"] = json!(e);
            (1, vec![e])
        }
    };
    doc["wall_s"] = json!(clock::secs(mono_ns() - t_start));
    doc["ok"] = json!(problems.is_empty());
    doc["problems"] = json!(problems);
    write_doc(&doc, out.as_deref())?;
    if !cfg.quiet {
        for p in &problems {
            eprintln!("loadgen: PROBLEM: {p}");
        }
    }
    Ok(code)
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(match real_main(&argv) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e}");
            1
        }
    });
}

fn real_main(argv: &[String]) -> Result<i32, String> {
    let a = Args::parse(argv)?;
    let Some(scenario) = a.subcommand.clone() else {
        print!("{HELP}");
        return Ok(1);
    };
    if matches!(scenario.as_str(), "help" | "-h") || a.has("help") {
        print!("{HELP}");
        return Ok(0);
    }
    let common = parse_common(&a)?;
    if scenario == "soak" {
        return run_soak(&a, &common);
    }
    let (plan, params) = parse_plan(&scenario, &a, &common)?;
    let procs: u32 = a.get("procs", 1)?;
    let shard = a.opt_str("shard");
    let pids: Vec<u32> = a.list("server-pid", &[])?;
    let redis = redisinfo::RedisProbe {
        pid: a
            .opt_str("redis-pid")
            .map(|p| p.parse())
            .transpose()
            .map_err(|_| "--redis-pid: a pid")?,
        addr: a
            .opt_str("redis")
            .map(|r| ws::parse_targets(&r).map(|t| t[0]))
            .transpose()
            .map_err(|e| format!("--redis: {e}"))?,
    };
    let out = a.opt_str("out");
    let quiet = a.flag("quiet");
    let max_seconds: f64 = a.get("max-seconds", 600.0)?;
    a.finish()?;
    let deadline = mono_ns() + (max_seconds.clamp(1.0, 7200.0) * 1e9) as u64;
    if let Some(sh) = shard {
        return run_worker(&plan, &sh, deadline, quiet);
    }

    let t_start = mono_ns();
    let (results, sampler) = if procs > 1 {
        let mut sampler = Sampler::new(pids.clone());
        sampler.redis = redis.clone();
        let r = coord::run_parent(&child_args(argv), procs, &mut sampler);
        (r, sampler)
    } else {
        let mut sampler = Sampler::new(pids.clone());
        sampler.redis = redis.clone();
        run_local(&plan, sampler, deadline, quiet)
    };
    let mut problems = Vec::new();
    let mut doc = json!({
        "scenario": scenario,
        "label": common.label,
        "proto": format!("{:?}", common.proto).to_lowercase(),
        "target": targets_str(&common.targets),
        "targets": common.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        "workers": procs.max(1),
        "params": params,
        "server_pids": pids,
    });
    match results {
        Err(e) => {
            problems.push(e.clone());
            doc["error"] = json!(e);
        }
        Ok(results) => {
            let body = summarize(&plan, results, &sampler, &mut problems);
            if let (Value::Object(d), Value::Object(b)) = (&mut doc, body) {
                d.extend(b);
            }
        }
    }
    if sampler.has_pids() {
        doc["server_samples"] = json!(sampler.samples);
    }
    doc["wall_s"] = json!(clock::secs(mono_ns() - t_start));
    doc["ok"] = json!(problems.is_empty());
    doc["problems"] = json!(problems);
    write_doc(&doc, out.as_deref())?;
    if !quiet {
        print_warnings(&doc, &problems);
    }
    if doc.get("error").is_some() {
        Ok(1)
    } else if problems.is_empty() {
        Ok(0)
    } else {
        Ok(2)
    }
}

/// A worker process (`--shard i/N`): runs its share and hands the raw result to the parent.
fn run_worker(plan: &Plan, shard: &str, deadline: u64, quiet: bool) -> Result<i32, String> {
    let (i, n) = shard.split_once('/').ok_or("--shard i/N")?;
    let (i, n): (u32, u32) = (
        i.parse().map_err(|_| "--shard")?,
        n.parse().map_err(|_| "--shard")?,
    );
    let mut ctx = Ctx {
        shard: i,
        shards: n.max(1),
        coord: Coord::Worker(std::io::BufReader::new(std::io::stdin())),
        deadline,
        quiet,
    };
    let r = run_shard(plan, &mut ctx);
    println!(
        "RESULT {}",
        serde_json::to_string(&r).map_err(|e| e.to_string())?
    );
    Ok(0)
}

/// A lone process: runs everything itself, sampling the server at its barriers.
fn run_local(
    plan: &Plan,
    sampler: Sampler,
    deadline: u64,
    quiet: bool,
) -> (Result<Vec<ShardResult>, String>, Sampler) {
    let mut ctx = Ctx {
        shard: 0,
        shards: 1,
        coord: Coord::Local(sampler),
        deadline,
        quiet,
    };
    let r = run_shard(plan, &mut ctx);
    let Coord::Local(sampler) = ctx.coord else {
        unreachable!()
    };
    match r {
        ShardResult::Error(e) => (Err(e), sampler),
        r => (Ok(vec![r]), sampler),
    }
}

/// The parent's arguments for its workers: ours minus `--procs`, `--out`, `--server-pid`
/// (the parent adds `--shard` for each).
fn child_args(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for (j, x) in argv.iter().enumerate() {
        if skip {
            skip = false;
            continue;
        }
        let name = x.split('=').next().unwrap_or("");
        if matches!(
            name,
            "--procs" | "--out" | "--server-pid" | "--redis-pid" | "--redis"
        ) {
            skip = !x.contains('=') && argv.get(j + 1).is_some_and(|n| !n.starts_with("--"));
            continue;
        }
        out.push(x.clone());
    }
    out
}

/// Merges the workers' results into the scenario's report.
fn summarize(
    plan: &Plan,
    results: Vec<ShardResult>,
    sampler: &Sampler,
    problems: &mut Vec<String>,
) -> Value {
    match plan {
        Plan::Traffic(cfg, slo) => {
            let v: Vec<_> = results
                .into_iter()
                .filter_map(|r| match r {
                    ShardResult::Traffic(t) => Some(t),
                    _ => None,
                })
                .collect();
            let mut body = summary::traffic(&v, sampler, *slo, problems);
            let done = v.first().map_or(0, |t| t.steps.len());
            if done > 0 && done < cfg.rates.len() {
                body["stopped_early"] = json!(format!(
                    "the step at {} msg/s overloaded the server; higher rates were not run",
                    cfg.rates[done - 1]
                ));
            }
            body
        }
        Plan::Idle(..) => {
            let v: Vec<_> = results
                .into_iter()
                .filter_map(|r| match r {
                    ShardResult::Idle(t) => Some(t),
                    _ => None,
                })
                .collect();
            summary::idle(&v, sampler, problems)
        }
        Plan::Storm(..) => {
            let v: Vec<_> = results
                .into_iter()
                .filter_map(|r| match r {
                    ShardResult::Storm(t) => Some(t),
                    _ => None,
                })
                .collect();
            summary::storm(&v, sampler, problems)
        }
    }
}

/// The server addresses as given: `ADDR[,ADDR..]`.
fn targets_str(t: &[SocketAddrV4]) -> String {
    t.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn write_doc(doc: &Value, out: Option<&str>) -> Result<(), String> {
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    match out {
        Some(path) => std::fs::write(path, text + "\n").map_err(|e| format!("{path}: {e}")),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}

/// Each step's generator warnings and noise, and every problem, on stderr.
fn print_warnings(doc: &Value, problems: &[String]) {
    for st in doc["steps"].as_array().into_iter().flatten() {
        for (kind, list) in [
            ("GENERATOR", &st["generator"]["warnings"]),
            ("NOISE", &st["noise"]),
        ] {
            for w in list.as_array().into_iter().flatten() {
                eprintln!(
                    "loadgen: step {} (rate {}): {kind}: {}",
                    st["step"],
                    st["offered_rate"],
                    w.as_str().unwrap_or("")
                );
            }
        }
    }
    for p in problems {
        eprintln!("loadgen: PROBLEM: {p}");
    }
}
