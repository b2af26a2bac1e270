"""chatterbox as a service: the systemd unit in deploy/ is valid and hardened, its environment
file is read as settings, and the database goes to the state directory systemd hands over.

`systemd-analyze` comes with Debian's `systemd` package (scripts/test installs it when missing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, STARTUP_TIMEOUT, binary_path, free_port, http_request

UNIT = REPO_ROOT / "deploy" / "chatterbox.service"
ENV_FILE = REPO_ROOT / "deploy" / "chatterbox.env"
INSTALLED_BIN = "/usr/local/bin/chatterbox"


def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd; scripts/test does)")
    return tool


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at the binary under test (verify needs it to exist)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_BIN}\n" in text, "the README's install path"
    out = tmp_path / "chatterbox.service"
    out.write_text(text.replace(INSTALLED_BIN, str(binary_path().resolve())))
    return out


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_passes_systemd_analyze_verify(unit_copy: Path):
    tool = analyze()
    r = subprocess.run([tool, "verify", "--man=no", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "", f"{r.stdout}\n{r.stderr}"


def test_a_broken_unit_fails_verify(tmp_path: Path, unit_copy: Path):
    """The check above can fail: a typo in a directive and a missing binary are both caught."""
    tool = analyze()
    bad = tmp_path / "bad.service"
    bad.write_text(unit_copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=stricct"))
    r = subprocess.run([tool, "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert "stricct" in r.stderr, r.stderr  # a warning, exit 0: hence the empty-stderr check
    gone = tmp_path / "gone.service"
    gone.write_text(UNIT.read_text().replace(INSTALLED_BIN, str(tmp_path / "no-such-binary")))
    r = subprocess.run([tool, "verify", "--man=no", str(gone)], capture_output=True, text=True)
    assert r.returncode != 0, r.stderr


def test_unit_exposure_is_low(unit_copy: Path):
    """`systemd-analyze security` rates the unit at most 2.0 ("OK"; 10 is unprotected)."""
    tool = analyze()
    r = subprocess.run([tool, "security", "--offline=yes", "--threshold=20", str(unit_copy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_unit_has_the_settings_the_issue_asks_for():
    s = unit_settings()
    for key, value in [("DynamicUser", "yes"), ("StateDirectory", "chatterbox"),
                       ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                       ("Restart", "on-failure"),
                       ("EnvironmentFile", "/etc/chatterbox/chatterbox.env")]:
        assert s.get(key) == [value], (key, s.get(key))
    # No DB_PATH or --db-path in the unit: the state directory is the default.
    assert "db-path" not in s["ExecStart"][0]


def env_file_settings() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and key.isupper(), f"not NAME=value: {line!r}"
            out[key] = value
    return out


def test_env_file_names_only_real_settings():
    """Every NAME in the example file, commented out or not, is a setting of --help."""
    help_text = subprocess.run([str(binary_path()), "--help"], capture_output=True,
                               text=True, check=True).stdout
    names = set(env_file_settings())
    for line in ENV_FILE.read_text().splitlines():
        body = line.lstrip("#").strip()
        if "=" in body and body.split("=", 1)[0].isupper() and " " not in body.split("=", 1)[0]:
            names.add(body.split("=", 1)[0])
    assert {"HOST", "PORT", "LOG_LEVEL", "HISTORY_MAX_AGE", "JWT_SECRET"} <= names
    for name in names:
        assert f" {name} " in help_text, f"{name} is not a setting"


def start_as_service(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env_file_settings(), **env,
            "HOST": "127.0.0.1", "PORT": str(port)}
    proc = subprocess.Popen([str(binary_path())], cwd=cwd, env=full, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            if http_request(port, "/health", timeout=1.0).status == 200:
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("no /health")


def stop(proc: subprocess.Popen) -> str:
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    return err.decode()


def test_the_database_goes_to_the_state_directory_not_the_working_directory(tmp_path: Path):
    """As systemd starts it: the env file's settings, STATE_DIRECTORY, an unrelated cwd."""
    state, cwd = tmp_path / "state", tmp_path / "cwd"
    state.mkdir()
    cwd.mkdir()
    proc, _ = start_as_service({"STATE_DIRECTORY": str(state)}, cwd)
    stop(proc)
    assert (state / "chatterbox.db").is_file()
    assert list(cwd.iterdir()) == [], "nothing in the working directory"


def test_an_explicit_db_path_wins_over_the_state_directory(tmp_path: Path):
    state, cwd = tmp_path / "state", tmp_path / "cwd"
    state.mkdir()
    cwd.mkdir()
    elsewhere = tmp_path / "elsewhere.db"
    proc, _ = start_as_service({"STATE_DIRECTORY": str(state), "DB_PATH": str(elsewhere)}, cwd)
    stop(proc)
    assert elsewhere.is_file()
    assert not (state / "chatterbox.db").exists()


def test_a_state_directory_that_cannot_be_written_fails_at_start(tmp_path: Path):
    """A missing state directory is an error naming the file, exit 1, not a database elsewhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    full = {"PATH": os.environ.get("PATH", ""), "STATE_DIRECTORY": str(tmp_path / "missing"),
            "HOST": "127.0.0.1", "PORT": str(free_port())}
    r = subprocess.run([str(binary_path())], cwd=cwd, env=full, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0
    assert str(tmp_path / "missing" / "chatterbox.db") in r.stderr, r.stderr
    assert list(cwd.iterdir()) == []
