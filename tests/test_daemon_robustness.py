"""The daemon as an unlucky operator or a hostile client meets it (issue 11, defects 4, 8
and 9), with the real daemon process (tests/daemon_harness.py): a FIFO as its
configuration, a worker stuck on a lock another process holds, SIGTERM whatever it is
doing, malformed requests, one `state` per root, and `ctl` in pipelines.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess, wait_until
from tests.helpers import PKGLAYER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon reads roots as root")

SETTLED = ("ready", "idle", "error", "missing")


def tiny_root(path: Path, text: str = "hello") -> Path:
    (path / "etc").mkdir(parents=True)
    (path / "etc" / "motd").write_text(text)
    (path / "usr" / "bin").mkdir(parents=True)
    (path / "usr" / "bin" / "tool").write_bytes(text.encode() * 1000)
    return path


def start(tmp_path: Path, daemons: list, roots: list[dict] | None = None, **settings) -> DaemonProcess:
    if roots is None:
        roots = [{"name": "tiny", "path": str(tiny_root(tmp_path / "roots" / "tiny")), "format": "none",
                  "debounce": 0.5, "output": f"oci:{tmp_path}/out/tiny:latest"}]
    d = DaemonProcess(tmp_path / "d", roots, daemon=settings)
    daemons.append(d)
    return d.start()


def ctl(d: DaemonProcess, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*PKGLAYER, "ctl", "--socket", d.socket, *args], capture_output=True, text=True, **kw)


def stop_within(d: DaemonProcess, seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.proc is not None
    try:
        code = d.proc.wait(seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the daemon did not stop within {seconds} s:\n{d.log()[-4000:]}") from None
    return code, time.monotonic() - started


def test_a_fifo_as_the_configuration_cannot_wedge_reloads_builds_health_or_stop(tmp_path: Path, daemons) -> None:
    d = start(tmp_path, daemons)
    d.wait_root("tiny", lambda r: r["state"] == "ready", 60)
    d.config.unlink()
    os.mkfifo(d.config)  # nobody will ever write to it
    for _ in range(5):
        d.signal(signal.SIGHUP)
        time.sleep(0.2)
    wait_until(lambda: d.log().count("reload: keeping the running configuration") >= 5, 15,
               "five reloads refused")
    assert "is not a regular file" in d.log()
    status, health = d.api("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok", health
    status, body = d.api("POST", "/v1/roots/tiny/build", {"wait": True, "timeout": 60})
    assert status == 200 and body["build"]["state"] == "succeeded", body
    code, took = stop_within(d, 20)
    assert code == 0


def test_a_stuck_worker_shows_in_health_and_sigterm_still_stops_the_daemon(tmp_path: Path, daemons) -> None:
    d = start(tmp_path, daemons, **{"stall-timeout": 2, "stop-timeout": 3})
    d.wait_root("tiny", lambda r: r["state"] == "ready", 60)
    # Another process sharing the cache (a second daemon evicting, say) holds its gc lock:
    # the next build waits for it in a worker thread, as long as it is held.
    lock = os.open(d.cache_dir / "gc.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        status, body = d.api("POST", "/v1/roots/tiny/build", {})
        assert status == 202, body
        build_id = body["build"]["id"]

        def stuck():
            return [w for w in d.api("GET", "/v1/health")[1]["stuck"] if build_id in w["what"]]
        (work,) = wait_until(stuck, 20, "health to report the stuck build")
        assert work["root"] == "tiny" and work["idleSeconds"] >= 2
        proc = ctl(d, "health")
        assert proc.returncode == 1 and proc.stdout.startswith("stuck:"), proc.stdout
        assert f"stuck: build {build_id} of root tiny: no progress for" in proc.stdout

        # A reload still works: it does not need the build's thread.
        d.roots.append({"name": "second", "path": str(tiny_root(tmp_path / "roots" / "second")),
                        "format": "none"})
        d.write_config()
        d.signal(signal.SIGHUP)
        d.wait_root("second", lambda r: r["state"] != "starting", 20)

        code, took = stop_within(d, 20)
        assert code == 0 and took < 3 + 5, took
        assert f"build {build_id} of root tiny did not finish within 3 s; exiting without it" in d.log()
    finally:
        os.close(lock)
    # The next start finds a consistent cache and serves again.
    d.start()
    # Both roots build after the restart; a temp file is only stale once neither is writing.
    for name in ("tiny", "second"):
        d.wait_root(name, lambda r: r["state"] == "ready", 60)
    assert list((d.cache_dir / ".pkglayer-tmp").iterdir()) == []
    assert stop_within(d, 20)[0] == 0


def test_malformed_requests_are_one_warning_line_each(tmp_path: Path, daemons) -> None:
    d = start(tmp_path, daemons)
    before = len(d.log().splitlines())
    bad = [b"NOT HTTP AT ALL\r\n\r\n", b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
           b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n"]
    for raw in bad:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(d.socket)
            s.sendall(raw)
            s.settimeout(10)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0], answer
    for body in (b"[" * 60_000, b"\xff\xfe", b'{"wait": "soon"}', b'{"timeout": 1e400}', b'{"x": 1}'):
        status, answer = d.api("POST", "/v1/roots/tiny/build", raw=body)
        assert status == 400 and answer["error"]["status"] == 400, (body[:20], answer)
    status, _ = d.api("GET", "/v1/builds/b1?wait=nan")
    assert status in (400, 404)
    time.sleep(0.5)
    new = d.log().splitlines()[before:]
    warnings = [line for line in new if "malformed request" in line or "bad request" in line]
    assert len(warnings) >= len(bad) + 5, "\n".join(new)
    assert not [line for line in new if "Traceback" in line or ": error:" in line], "\n".join(new)
    status, health = d.api("GET", "/v1/health")
    assert status == 200 and health["status"] == "ok"


def test_each_root_has_one_state_that_says_when_it_has_settled(tmp_path: Path, daemons) -> None:
    roots = [
        {"name": "auto", "path": str(tiny_root(tmp_path / "roots" / "auto")), "format": "none", "debounce": 0.5},
        # with one build slot (parallel-builds = 1), one of these waits for the other
        {"name": "auto2", "path": str(tiny_root(tmp_path / "roots" / "auto2", "other")), "format": "none"},
        {"name": "manual", "path": str(tiny_root(tmp_path / "roots" / "manual")), "format": "none",
         "auto-build": False},
        {"name": "nowhere", "path": str(tmp_path / "roots" / "nowhere"), "format": "none"},
    ]
    d = DaemonProcess(tmp_path / "d", roots)
    daemons.append(d)
    d.start(wait_ready=False)
    seen: dict[str, list[str]] = {"auto": [], "auto2": [], "manual": [], "nowhere": []}

    def settled() -> bool:
        try:
            status, body = d.api("GET", "/v1/roots")
        except OSError:
            return False
        for r in body["roots"]:
            seen[r["name"]].append(r["state"])
        return all(seen[n] and seen[n][-1] in SETTLED for n in seen) and \
            seen["auto"][-1] == seen["auto2"][-1] == "ready"
    wait_until(settled, 60, "every root to settle", interval=0.01)
    # Before settling, a root never looks settled: no "idle" or "ready" while it starts,
    # waits for a build slot or prebuilds.
    for name in ("auto", "auto2"):
        states = seen[name]
        assert set(states[: states.index("ready")]) <= {"starting", "waiting", "prebuilding"}, (name, states)
        assert "idle" not in states, (name, states)
    assert "waiting" in seen["auto"] + seen["auto2"], "one root waited for the other's build slot"
    assert seen["manual"][-1] == "idle" and seen["nowhere"][-1] == "missing"
    status, auto = d.api("GET", "/v1/roots/auto")
    assert auto["lastPrebuild"]["ok"] and not auto["pending"]


def test_ctl_build_says_it_only_queued_and_a_closed_stdout_is_no_error(tmp_path: Path, daemons) -> None:
    d = start(tmp_path, daemons)
    d.wait_root("tiny", lambda r: r["state"] == "ready", 60)
    proc = ctl(d, "build", "tiny")
    assert proc.returncode == 0
    (line,) = proc.stdout.splitlines()
    assert line.startswith("queued build b") and line.endswith(f"; pkglayer ctl wait {line.split()[2]}"), line
    waited = ctl(d, *line.split("; pkglayer ctl ")[1].split())
    assert waited.returncode == 0 and "succeeded" in waited.stdout

    # `pkglayer ctl build --wait | head -1`: the reader leaves after one line.
    proc = subprocess.Popen([*PKGLAYER, "ctl", "--socket", d.socket, "build", "tiny", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before anything is printed: every write meets a closed pipe
    assert proc.wait(60) == 0
    assert proc.stderr.read() == b""
    proc = subprocess.run(f"{shlex.join(PKGLAYER)} ctl --socket {d.socket} --json roots | head -c 10",
                          shell=True, capture_output=True, text=True)
    assert proc.stderr == ""


def test_misspelt_settings_name_the_key_they_resemble(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    for text, message in [
        ("[daemon]\nstate_dir = '/x'\n", "daemon.state_dir: unknown setting (did you mean 'state-dir'?)"),
        ("[[root]]\nname = 'a'\npath = '/r'\nauto_build = false\n",
         "root[0].auto_build: unknown setting (did you mean 'auto-build'?)"),
        ("[build]\nmax_layers = 10\n", "unknown setting build.max_layers (did you mean 'max-layers'?)"),
        ("[deamon]\n", "deamon: unknown table (did you mean 'daemon'?)"),
    ]:
        conf.write_text(text)
        proc = subprocess.run([*PKGLAYER, "daemon", "--config", str(conf)], capture_output=True, text=True)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_the_stop_timeout_ends_before_systemd_would_kill() -> None:
    import re

    from pkglayer.daemon.config import DEFAULT_STOP_TIMEOUT, load_daemon_config

    repo = Path(__file__).resolve().parent.parent
    unit = (repo / "systemd" / "pkglayer.service").read_text()
    stop_sec = int(re.search(r"(?m)^TimeoutStopSec=(\d+)$", unit).group(1))
    shipped = load_daemon_config(str(repo / "conf" / "pkglayer.toml"))
    assert shipped.stop_timeout == DEFAULT_STOP_TIMEOUT
    # Room for the API's 2 s grace and the exit itself before SIGKILL.
    assert stop_sec >= DEFAULT_STOP_TIMEOUT + 10
