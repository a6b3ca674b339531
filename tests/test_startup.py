"""What `pkglayer build` loads before it starts: an unchanged rebuild is mostly Python
start-up (issue 12), so a local build must not load the registry client or the
zstd:chunked encoder just by being imported."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

# ssl, urllib.request and http.client: registry.py's blob check before a push; zstandard
# and anycrc: zstd layers and zstd:chunked's TOC. Together ~45 ms of every start.
# wcmatch's glob (with bracex): excludes and component globs, compiled when first matched
# (an unchanged rebuild matches none); tarfile: PAX headers and archives; tempfile and
# shutil: workspaces and the rpm database's copy; csv: pip's RECORD files. ~30 ms more.
NOT_AT_START = (
    "ssl", "urllib.request", "http.client", "zstandard", "anycrc", "wcmatch._wcparse", "bracex", "tarfile",
    "tempfile", "shutil", "csv",
)

_CHILD = """
import json, sys
before = set(sys.modules)
import pkglayer.cli, pkglayer.outputs, pkglayer.build
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_build_command_modules_load_no_registry_client_or_zstd():
    # Each name must be installed, or its absence from sys.modules would prove nothing.
    assert all(importlib.util.find_spec(name) is not None for name in NOT_AT_START)
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True).stdout
    added = set(json.loads(out))
    assert "pkglayer.build" in added  # what the child saw was the import itself
    assert sorted(added & set(NOT_AT_START)) == []


_REBUILD = """
import json, sys
from pkglayer.cli import main
code = main(["build", sys.argv[1], "--layers", sys.argv[2], "--format", "none", "-q"])
print(json.dumps([code, sorted(sys.modules)]))
"""


def test_an_unchanged_rebuild_compiles_no_glob_and_writes_no_tar(tmp_path) -> None:
    """What a rebuild of an unchanged tree never needs is never loaded: no exclude or
    xattr glob is matched (every path is the kept scan's), no tar header is made; and
    the rebuild after it, answered from the memo, loads none of the pipeline."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello")
    (root / "etc" / ".hidden").write_text("dot file")
    (root / "etc" / "motd.\u00e9t\u00e9").write_text("a name only a PAX header holds: tarfile writes it")
    (root / "var" / "lib" / "rpm").mkdir(parents=True)
    # a path that the excludes' regex must judge (**/rpmdb.sqlite-shm); tmp/** takes no regex
    (root / "var" / "lib" / "rpm" / "rpmdb.sqlite-shm").write_text("excluded")
    layers = tmp_path / "layers"
    time.sleep(2.5)  # older than the kept scan's racy window: the rebuild trusts every lstat

    def build() -> set[str]:
        out = subprocess.run([sys.executable, "-c", _REBUILD, str(root), str(layers)], check=True,
                             capture_output=True, text=True).stdout
        code, modules = json.loads(out.splitlines()[-1])  # after the build's own summary
        assert code == 0
        return set(modules)

    first = build()
    assert {"wcmatch._wcparse", "tarfile"} <= first  # the first build matched excludes and wrote a layer
    assert sorted(build() & {"wcmatch._wcparse", "bracex", "tarfile", "tempfile"}) == []
    # The third is answered from the memo the second kept (it builds nothing), with the
    # settings and the memo's modules alone: no dataclasses and inspect (~8 ms), no typing.
    answered = build()
    assert "pkglayer.memo" in answered and "pkglayer.build" not in answered
    assert sorted(answered & {"dataclasses", "inspect", "typing", "pkglayer.usercomponents"}) == []


def test_the_command_exits_with_mains_status_and_all_of_its_output(tmp_path) -> None:
    """`pkglayer` (cli.run) skips the interpreter's teardown: what main() wrote still
    reaches a pipe whole, and the exit status is main()'s."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for i in range(300):  # output larger than a pipe buffer's first write
        (root / "etc" / f"file-{i:03}").write_text(str(i))

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pkglayer", *args], capture_output=True, text=True)

    missing = command("build", str(tmp_path / "nothing"), "--layers", str(tmp_path / "layers"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    done = command("plan", str(root), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)  # complete: a cut-off document does not parse


def _commands(parser) -> list[str]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return list(sub.choices)


def test_a_command_line_builds_only_the_parser_of_its_command(capsys) -> None:
    """Filling in every command's options took 4-11 ms of each start: a command line
    that names a command gets that command's parser alone, while top-level help and a
    mistyped command still see them all."""
    from pkglayer.cli import _COMMANDS, _named_command, main, make_parser

    assert _named_command(["build", "./root", "--output", "oci:x"]) == "build"
    assert _named_command(["--version"]) is None
    assert _named_command(["bild", "./root"]) is None
    assert _named_command(["--", "build"]) is None
    assert _commands(make_parser("ctl")) == ["ctl"]
    assert _commands(make_parser()) == list(_COMMANDS) == [
        "build", "push", "layers", "scan", "plan", "diff", "daemon", "ctl"]

    assert main(["diff", "/nonexistent/a.json", "/nonexistent/b.json"]) == 1
    assert "/nonexistent/a.json" in capsys.readouterr().err
    for argv in (["--help"], ["bild"]):
        try:
            main(argv)
        except SystemExit:
            pass
        said = capsys.readouterr()
        assert all(name in said.out + said.err for name in _COMMANDS), argv
    try:
        main(["build", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "--max-layers" in capsys.readouterr().out
