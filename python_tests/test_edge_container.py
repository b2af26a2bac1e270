"""The container image (deploy/Dockerfile): built with podman from the static musl binary, then
started and asked for /health.

Part of `scripts/test --slow` (it needs `scripts/release`'s x86_64 musl binary and podman, which
that part installs); skipped otherwise. `podman run` is tried first; where the sandbox refuses
it (on the machines this was written on crun cannot set RLIMIT_NOFILE/RLIMIT_NPROC: "OCI
permission denied"), the image's filesystem is exported with `podman create` + `podman export`
and the binary started from it under `chroot` as the image's user, which is what the image
would run. The test prints which of the two it used.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, STARTUP_TIMEOUT, free_port, http_request

BIN = "dist/chatterbox-x86_64-unknown-linux-musl"

pytestmark = pytest.mark.skipif(
    os.environ.get("CHATTERBOX_SLOW") != "1",
    reason="slow part: run with scripts/test --slow (needs scripts/release and podman)")


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"podman {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r


@pytest.fixture(scope="module")
def image():
    assert shutil.which("podman"), "podman is not installed"
    assert (REPO_ROOT / BIN).is_file(), f"{BIN} missing: run scripts/release first"
    tag = f"localhost/chatterbox-test:{os.getpid()}"
    podman("build", "-f", str(REPO_ROOT / "deploy" / "Dockerfile"), "--build-arg", f"BIN={BIN}",
           "-t", tag, str(REPO_ROOT))
    yield tag
    podman("rmi", "-f", tag, check=False)


def image_config(tag: str) -> dict:
    return json.loads(podman("image", "inspect", tag, "--format", "{{json .Config}}").stdout)


def test_image_is_scratch_non_root_with_a_data_volume(image):
    cfg = image_config(image)
    assert cfg["User"] == "65534:65534"
    assert "/data" in cfg["Volumes"]
    assert cfg["Entrypoint"] == ["/chatterbox"]
    assert "8080/tcp" in cfg["ExposedPorts"]
    assert "DB_PATH=/data/chatterbox.db" in cfg["Env"]
    # FROM scratch: one layer with the binary, one with /data, nothing else.
    layers = json.loads(podman("image", "inspect", image, "--format",
                               "{{json .RootFS.Layers}}").stdout)
    assert len(layers) == 2, layers


def wait_health(port: int, alive) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert alive(), "the server exited"
        try:
            if http_request(port, "/health", timeout=1.0).status == 200:
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"no /health on port {port}")


def run_with_podman(image: str, port: int) -> bool:
    """`podman run`; False (with the error printed) when the sandbox refuses it."""
    r = podman("run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}",
               "-e", "HOST=127.0.0.1", image, check=False, timeout=120)
    if r.returncode != 0:
        print(f"podman run refused (exit {r.returncode}): {r.stderr.strip()}")
        return False
    cid = r.stdout.strip()
    try:
        wait_health(port, lambda: podman("inspect", cid, "--format", "{{.State.Running}}",
                                         check=False).stdout.strip() == "true")
        assert http_request(port, "/health").body == b"ok"
        r = podman("stop", "-t", "10", cid, check=False)
        print("podman run: /health ok")
        return True
    finally:
        podman("rm", "-f", cid, check=False)


def test_the_image_serves_health_and_writes_its_database_in_data(image, tmp_path: Path):
    port = free_port()
    if run_with_podman(image, port):
        return
    # The fallback: the image's own filesystem, its own user, its own environment.
    cid = podman("create", image).stdout.strip()
    root = tmp_path / "rootfs"
    root.mkdir()
    tar = tmp_path / "image.tar"
    try:
        podman("export", "-o", str(tar), cid)
    finally:
        podman("rm", "-f", cid, check=False)
    with tarfile.open(tar) as t:
        if hasattr(tarfile, "tar_filter"):
            t.extractall(root, filter="tar")
        else:  # Python without extraction filters (the archive is podman's own export)
            t.extractall(root)
    assert sorted(p.name for p in root.iterdir()) == ["chatterbox", "data"]
    assert (root / "data").stat().st_uid == 65534
    cfg = image_config(image)
    env = dict(e.split("=", 1) for e in cfg["Env"])
    env.update(HOST="127.0.0.1", PORT=str(port))
    user = cfg["User"]
    proc = subprocess.Popen(["/usr/sbin/chroot", f"--userspec={user}", str(root), *cfg["Entrypoint"]],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_health(port, lambda: proc.poll() is None)
        assert http_request(port, "/health").body == b"ok"
        db = root / "data" / "chatterbox.db"
        assert db.is_file() and db.stat().st_uid == 65534, "the database is the image user's"
        proc.terminate()
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()
        assert "chatterbox stopped" in err.decode()
        print(f"podman create + export + chroot --userspec={user}: /health ok, "
              f"database in /data, SIGTERM exits 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
