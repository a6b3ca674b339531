"""Service behaviour of the real daemon process: sd_notify (Type=notify, watchdog),
SIGHUP reload, the socket's permissions, the systemd unit, `pkglayer ctl`."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import rootfs_factory as factory
from tests.daemon_harness import REPO, DaemonProcess, copy_root, root_entry, start, wait_until
from tests.helpers import require_tools


class NotifyListener:
    """The systemd side of sd_notify: an AF_UNIX datagram socket; records (time, message)."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.callbacks: list = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            self.messages.append((time.monotonic(), text))
            for cb in self.callbacks:
                cb(text)

    def fields(self) -> list[str]:
        return [f for _, m in self.messages for f in m.split("\n")]

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture(scope="module")
def small_root(deb_rootfs: Path) -> Path:
    return factory.deb_base()


def test_type_notify_ready_after_the_initial_scan_watchdog_pings_reload_and_stop(
    tmp_path: Path, small_root: Path, daemons
) -> None:
    roots = [copy_root(small_root, tmp_path / "roots" / n) for n in ("a", "b")]
    listener = NotifyListener(tmp_path / "notify.sock")
    seen_at_ready: list = []
    d = DaemonProcess(
        tmp_path / "d",
        [root_entry(r.name, r, **{"auto-build": False}) for r in roots],
        env={"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "1000000"},
    )
    daemons.append(d)

    def on_message(text: str) -> None:
        if "READY=1" in text.split("\n") and not seen_at_ready:
            # At READY, the initial scan of every root is done: the API already knows them.
            seen_at_ready.append(d.api("GET", "/v1/roots")[1])

    listener.callbacks.append(on_message)
    try:
        d.start(wait_ready=False)
        wait_until(lambda: seen_at_ready, 60, "READY=1")
        roots_at_ready = seen_at_ready[0]["roots"]
        assert [r["name"] for r in roots_at_ready] == ["a", "b"]
        assert all(r["packages"] == 88 and r["state"] != "starting" for r in roots_at_ready)
        fields = listener.fields()
        assert any(f.startswith("STATUS=initial scan") for f in fields[: fields.index("READY=1")])

        # WATCHDOG_USEC=1 s: a ping every 0.5 s.
        ready_time = next(t for t, m in listener.messages if "READY=1" in m)
        wait_until(lambda: sum("WATCHDOG=1" in m for t, m in listener.messages if t > ready_time) >= 4,
                   10, "four watchdog pings")
        pings = [t for t, m in listener.messages if "WATCHDOG=1" in m]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert max(gaps) < 0.9, gaps

        # SIGHUP: RELOADING=1, then READY=1 again.
        count = len(listener.messages)
        d.signal(signal.SIGHUP)
        wait_until(lambda: any("READY=1" in m for _, m in listener.messages[count:]), 30, "READY after reload")
        after = [f for _, m in listener.messages[count:] for f in m.split("\n")]
        assert after.index("RELOADING=1") < after.index("READY=1")
        assert any(f.startswith("MONOTONIC_USEC=") for f in after)

        assert d.stop() == 0
        assert "STOPPING=1" in listener.fields()
    finally:
        listener.close()


def test_sighup_adds_and_removes_roots_and_keeps_the_old_config_when_the_new_one_is_invalid(
    tmp_path: Path, small_root: Path, daemons
) -> None:
    a = copy_root(small_root, tmp_path / "roots" / "a")
    b = copy_root(small_root, tmp_path / "roots" / "b")
    d = start(daemons, tmp_path / "d", [root_entry("a", a, **{"auto-build": False})])
    assert [r["name"] for r in d.api("GET", "/v1/roots")[1]["roots"]] == ["a"]

    d.roots = [root_entry("b", b, **{"auto-build": False})]
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_until(lambda: [r["name"] for r in d.api("GET", "/v1/roots")[1]["roots"]] == ["b"], 30, "reload")
    # A new root shows as "starting" until its first scan is done.
    assert d.wait_root("b", lambda r: r["state"] != "starting", 30)["packages"] == 88
    assert d.api("GET", "/v1/roots/a")[0] == 404

    good = d.config.read_text()
    d.config.write_text(good + "[[root]]\nname = 'c'\npath = 'relative/path'\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in d.log(), 30, "the reload to be refused")
    assert "root[1].path: must be an absolute path" in d.log()
    assert [r["name"] for r in d.api("GET", "/v1/roots")[1]["roots"]] == ["b"]
    assert d.api("GET", "/v1/health")[1]["status"] == "ok"
    assert d.stop() == 0


def test_socket_is_created_owned_by_root_with_restrictive_modes(tmp_path: Path, small_root: Path, daemons) -> None:
    root = copy_root(small_root, tmp_path / "roots" / "a")
    d = start(daemons, tmp_path / "d1", [root_entry("a", root, **{"auto-build": False})])
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert d.stop() == 0
    assert not os.path.exists(d.socket)

    group = grp.getgrgid(4).gr_name if _gid_exists(4) else "daemon"  # "adm" on Debian
    d2 = start(daemons, tmp_path / "d2", [root_entry("a", root, **{"auto-build": False})],
               daemon={"socket-group": group})
    st = os.stat(d2.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_uid == 0 and st.st_gid == grp.getgrnam(group).gr_gid

    # A second daemon on the same socket refuses to start instead of stealing it.
    d3 = DaemonProcess(tmp_path / "d3", [root_entry("a", root, **{"auto-build": False})],
                       daemon={"socket": d2.socket})
    daemons.append(d3)
    d3.start(wait_ready=False)
    assert d3.proc.wait(60) == 1
    assert "another process is already listening" in d3.log()
    assert d2.api("GET", "/v1/health")[0] == 200

    # A stale socket file (its daemon was killed) is replaced.
    d2.kill()
    assert os.path.exists(d2.socket)
    d2.start()
    assert d2.api("GET", "/v1/health")[0] == 200
    assert d2.stop() == 0


def _gid_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
        return True
    except KeyError:
        return False


def test_ctl_tables_json_and_errors(tmp_path: Path, small_root: Path, daemons) -> None:
    root = copy_root(small_root, tmp_path / "roots" / "a")
    out = tmp_path / "layers"
    d = start(daemons, tmp_path / "d", [root_entry("a", root, layers=str(out))])
    d.wait_settled("a", rescans=0)

    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pkglayer", "ctl", "--socket", d.socket, *args],
                              capture_output=True, text=True, cwd=REPO, timeout=300)

    p = ctl("roots")
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()[:2]
    assert header.split()[:3] == ["ROOT", "STATE", "PKGS"] and row.split()[:3] == ["a", "ready", "88"]
    p = ctl("--json", "status")
    assert p.returncode == 0 and json.loads(p.stdout)["health"]["status"] == "ok"
    p = ctl("status", "a")
    assert "state:           ready" in p.stdout and "last prebuild:" in p.stdout
    p = ctl("health")
    assert p.stdout.startswith("ok: pkglayer")

    p = ctl("build", "a", "--wait")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "succeeded" in p.stdout and f"history {out}/history.json" in p.stdout
    history = json.loads((out / "history.json").read_text())
    # /layers protocol: every blob the history names is in output/ (taken from the cache).
    for layer in history["layers"]:
        assert (out / "output/blobs/sha256" / layer["digest"][7:]).is_file()

    p = ctl("--json", "build", "a")
    build_id = json.loads(p.stdout)["build"]["id"]
    p = ctl("wait", build_id)
    assert p.returncode == 0 and "succeeded" in p.stdout

    p = ctl("build", "nope")
    assert p.returncode == 1 and p.stderr.startswith("pkglayer: error: unknown root 'nope'")
    p = subprocess.run([sys.executable, "-m", "pkglayer", "ctl", "--socket", str(tmp_path / "none.sock"), "health"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 1 and "no daemon socket" in p.stderr
    assert d.stop() == 0


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    require_tools("systemd-analyze")
    unit = (REPO / "systemd/pkglayer.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "ProtectSystem=strict" in unit
    # ExecStart must name an existing binary for verify: point it at this venv's.
    exe = Path(sys.executable).parent / "pkglayer"
    assert exe.exists()
    local = unit.replace("/usr/local/bin/pkglayer", str(exe))
    assert local != unit
    path = tmp_path / "pkglayer.service"
    path.write_text(local)
    p = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "pkglayer.service" not in p.stderr, p.stderr  # no warnings about our unit
