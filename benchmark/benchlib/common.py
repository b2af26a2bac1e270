"""Paths, logging, pinning, the builds and the environment lines every mode shares."""

import atexit
import datetime
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
LOADGEN_DIR = os.path.join(BENCH, "loadgen")
LOADGEN = os.path.join(LOADGEN_DIR, "target", "release", "loadgen")
CHATTERBOX = os.path.join(ROOT, "target", "release", "chatterbox")
PEERS = os.path.join(BENCH, "peers")
VENV_PY = os.path.join(BENCH, ".venv", "bin", "python")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def have_taskset():
    return shutil.which("taskset") is not None and os.cpu_count() and os.cpu_count() >= 2


def pinned(core, cmd):
    return ["taskset", "-c", str(core)] + cmd if have_taskset() else cmd


def build(no_build, tls=False, cluster=False):
    if not no_build:
        wanted = (["tls"] if tls else []) + (["cluster"] if cluster else [])
        features = ["--features", ",".join(wanted)] if wanted else []
        log(f"building chatterbox (cargo build --release {' '.join(features)})")
        r = subprocess.run(["nice", "cargo", "build", "--release"] + features, cwd=ROOT)
        if r.returncode != 0:
            sys.exit("chatterbox build failed")
        log("building loadgen (cargo build --release)")
        r = subprocess.run(["nice", "cargo", "build", "--release"], cwd=LOADGEN_DIR)
        if r.returncode != 0:
            sys.exit("loadgen build failed")
    for p in (CHATTERBOX, LOADGEN):
        if not os.path.exists(p):
            sys.exit(f"missing {p}: build it or drop --no-build")


def chatterbox_bins(args):
    """[(tag, path)] of the chatterbox binaries to measure: `--chatterbox-bin TAG=PATH`
    (repeatable: before and after in one run), or [(None, the worktree's release build)]."""
    out = []
    for spec in getattr(args, "chatterbox_bin", None) or []:
        tag, sep, path = spec.partition("=")
        if not sep or not tag or not path:
            sys.exit(f"--chatterbox-bin wants TAG=PATH, got '{spec}'")
        path = os.path.abspath(path)
        if not os.access(path, os.X_OK):
            sys.exit(f"--chatterbox-bin {tag}: {path} is not an executable")
        out.append((tag, path))
    return out or [(None, CHATTERBOX)]


def descendants(pid):
    """pid and every process below it (peers may fork workers)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float) and x.is_integer() and nd == 0:
        return f"{int(x):,}"
    if isinstance(x, (int,)) or (isinstance(x, float) and nd == 0):
        return f"{x:,.0f}"
    return f"{x:,.{nd}f}"


def median(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


_ENV_LINES = None


def env_lines(args):
    """The environment, read once: call it right after the build so that the commit named is
    the one that was built, even when the run outlasts the next commit."""
    global _ENV_LINES
    if _ENV_LINES is None:
        _ENV_LINES = _env_lines(args)
    return list(_ENV_LINES)


def _env_lines(args):
    def sh(cmd):
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return "?"
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    lines = [
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- chatterbox commit: `{sh(['git', 'rev-parse', '--short', 'HEAD'])}`"
        + (" (work tree has changes)" if sh(['git', 'status', '--porcelain', '--', 'src', 'Cargo.toml']) else ""),
        f"- machine: {os.cpu_count()} cores ({model}); server pinned to CPU(s) {args.server_core}, "
        f"loadgen to CPU(s) {args.gen_core}" + ("" if have_taskset() else " (taskset unavailable: not pinned)"),
        f"- command: `benchmark/run {' '.join(sys.argv[1:])}`",
    ]
    if getattr(args, "cluster", None):
        redis = sh(["redis-server", "--version"]).split(" sha=")[0]
        sizes = " and ".join(map(str, getattr(args, "cluster_sizes", None) or [args.cluster]))
        lines.append(f"- cluster: {sizes} chatterbox nodes (`--redis`, build `--features cluster`) and "
                     f"{redis} (`--save '' --appendonly no`), every node and Redis pinned to CPU(s) "
                     f"{args.server_core} with the standalone server; loadgen on CPU(s) {args.gen_core} "
                     "spreads its connections over the nodes round-robin (connection i to node i % N)")
    return lines


def shown(cmd):
    """A command line as the reports show it: paths inside the repository relative to it."""
    return " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)


class StepWatch(threading.Thread):
    """Reads loadgen's progress lines (forwarding them unless quiet, problems always) and notes
    when its first traffic step has begun."""

    def __init__(self, stream, quiet):
        super().__init__(daemon=True)
        self.stream, self.quiet = stream, quiet
        self.started = threading.Event()

    def run(self):
        for line in self.stream:
            if " step 1/" in line:
                self.started.set()
            if not self.quiet or "PROBLEM" in line:
                sys.stderr.write(line)


def make_test_cert():
    """(cert, key): a self-signed P-256 certificate for 127.0.0.1 made with openssl in a temp
    folder, for `run --tls` (the server serves it, loadgen trusts it with --tls-ca)."""
    d = tempfile.mkdtemp(prefix="chatterbox-bench-tls-")
    atexit.register(shutil.rmtree, d, True)
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", key, "-out", cert,
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:FALSE"],
                   check=True, capture_output=True)
    return cert, key
