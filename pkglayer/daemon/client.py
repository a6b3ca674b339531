"""`pkglayer ctl`: a small client of the control API. Plain http.client over AF_UNIX,
so the command starts fast and needs no event loop."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from typing import Any

from ..errors import PkglayerError
from .config import DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class ApiError(PkglayerError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def request(socket_path: str, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
    conn = _UnixConnection(socket_path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except FileNotFoundError:
            raise PkglayerError(f"no daemon socket at {socket_path} (is pkglayer.service running?)") from None
        except ConnectionRefusedError:
            raise PkglayerError(f"nothing listens on {socket_path} (is pkglayer.service running?)") from None
        except PermissionError:
            raise PkglayerError(
                f"permission denied on {socket_path}: run as root or as a member of the socket's group"
            ) from None
        except TimeoutError:
            raise PkglayerError(f"the daemon did not answer within {timeout:.0f} s") from None
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            raise PkglayerError(f"the daemon sent a non-JSON answer (HTTP {resp.status})") from None
        if resp.status >= 400:
            message = payload.get("error", {}).get("message") if isinstance(payload, dict) else None
            raise ApiError(resp.status, message or f"HTTP {resp.status}")
        return payload
    finally:
        conn.close()


def _age(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.0f}h ago"


def _roots_table(roots: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'ROOT':<16} {'STATE':<12} {'PKGS':>5} {'READY':>5} {'RESCANS':>7} {'WRITTEN':>7} {'CACHED':>6}  "
             f"{'LAST BUILD':<14} ERROR"]
    for r in roots:
        last = r.get("lastBuild") or {}
        digest = (last.get("manifestDigest") or "")[7:19]
        built = f"{digest} {_age(last.get('finished'))}" if last else "-"
        lines.append(
            f"{r['name']:<16} {r['state']:<12} {r['packages']:>5} "
            f"{r['layersReady'] if r['layersReady'] is not None else '-':>5} "
            f"{r['rescans']:>7} {r['layersWritten']:>7} {r['layersFromCache']:>6}  {built:<14} {r['error'] or ''}"
        )
    return lines


def _build_lines(build: dict[str, Any]) -> list[str]:
    lines = [f"build {build['id']} of {build['root']}: {build['state']}"]
    if build.get("error"):
        lines.append(f"error: {build['error']}")
    res = build.get("result") or {}
    if res:
        lines.append(
            f"{len(res['layers'])} layers: {res['written']} written, {res['fromCache']} from the cache, "
            f"{res['reused'] - res['fromCache']} reused from earlier output; {res['seconds']:.2f} s"
        )
        written = [layer["name"] for layer in res["layers"] if not layer["reused"]]
        if written:
            lines.append("written: " + ", ".join(written))
        if res.get("image"):
            lines.append(f"image {res['image']} manifest {res['manifestDigest']}")
        # An output other than oci: is copied from the image above (the root's staged layout).
        lines += [f"wrote {dest}" for dest in res.get("published") or []]
        if res.get("history"):
            lines.append(f"history {res['history']}")
    return lines


def run_ctl(args) -> int:
    sock = args.socket or os.environ.get("PKGLAYER_SOCKET") or DEFAULT_SOCKET
    if args.socket is None and getattr(args, "config", None):
        from .config import load_daemon_config

        sock = load_daemon_config(args.config).socket
    out: list[str] = []
    code = 0
    if args.action == "health":
        data = request(sock, "GET", "/v1/health")
        out.append(f"{data['status']}: pkglayer {data['version']} pid {data['pid']}, up {data['uptime']:.0f} s, "
                   f"{data['roots']} roots" + (f", errors in: {', '.join(data['rootsWithErrors'])}"
                                               if data["rootsWithErrors"] else ""))
        for work in data.get("stuck") or []:
            out.append(f"stuck: {work['what']}: no progress for {work['idleSeconds']:.0f} s"
                       + (f" (in {work['phase']})" if work.get("phase") else ""))
        code = 0 if data["status"] == "ok" else 1
    elif args.action == "roots":
        data = request(sock, "GET", "/v1/roots")
        out += _roots_table(data["roots"])
    elif args.action == "status":
        if args.name:
            data = request(sock, "GET", f"/v1/roots/{args.name}")
            for key in ("name", "path", "state", "format", "packages", "compression", "output", "layers",
                        "events", "rescans", "prebuilds", "builds", "layersWritten", "layersFromCache",
                        "waitingFor", "error"):
                out.append(f"{key + ':':<16} {data.get(key) if data.get(key) is not None else '-'}")
            ch = data.get("changes") or {}
            for kind in ("added", "changed", "removed"):
                if ch.get(kind):
                    out.append(f"{'last ' + kind + ':':<16} {', '.join(ch[kind])}")
            pb = data.get("lastPrebuild")
            if pb:
                out.append(f"{'last prebuild:':<16} " + (
                    f"{len(pb['layers'])} layers, {pb['written']} written, {pb['fromCache']} cached, {pb['seconds']} s"
                    if pb.get("ok") else f"failed: {pb.get('error')}"))
            lb = data.get("lastBuild")
            if lb:
                out.append(f"{'last build:':<16} {lb['id']} {lb.get('manifestDigest') or lb.get('history')}")
        else:
            health = request(sock, "GET", "/v1/health")
            roots = request(sock, "GET", "/v1/roots")
            cache = request(sock, "GET", "/v1/cache")
            data = {"health": health, "roots": roots["roots"], "cache": cache}
            out.append(f"daemon: {health['status']}, pkglayer {health['version']}, pid {health['pid']}")
            out.append(f"cache: {cache['entries']} layers, {cache['bytes'] / 1e6:.1f} of "
                       f"{cache['maxBytes'] / 1e6:.0f} MB, {cache['hits']} hits, {cache['evicted']} evicted")
            out += _roots_table(roots["roots"])
    elif args.action == "cache":
        data = request(sock, "GET", "/v1/cache")
        out.append(f"{data['path']}: {data['entries']} layers, {data['bytes']} of {data['maxBytes']} bytes; "
                   f"{data['hits']} hits, {data['misses']} misses, {data['added']} added, {data['evicted']} evicted")
    elif args.action == "build":
        data = request(sock, "POST", f"/v1/roots/{args.name}/build",
                       body={"wait": bool(args.wait), "timeout": args.timeout},
                       timeout=args.timeout + 30 if args.wait else 30)
        build = data["build"]
        if args.wait:
            out += _build_lines(build)
            code = 0 if build["state"] == "succeeded" else 1
        else:
            # The answer comes before anything is built: say so, and how to follow it.
            out.append(f"queued build {build['id']} of {build['root']}; pkglayer ctl wait {build['id']}")
    elif args.action == "wait":
        data = request(sock, "GET", f"/v1/builds/{args.name}?wait={args.timeout}", timeout=args.timeout + 30)
        out += _build_lines(data["build"])
        code = 0 if data["build"]["state"] == "succeeded" else 1
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print("\n".join(out))
    return code
