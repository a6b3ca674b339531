"""The build memo (memo.py): an unchanged rebuild is answered from the last build, and
any change to what that build read makes the next one build again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pkglayer import memo as memo_module
from pkglayer.blobstore import BlobDir
from pkglayer.build import build
from pkglayer.config import BuildSettings
from pkglayer.keptscan import DiskScans, LastKept
from pkglayer.memo import BuildMemo, location_stamps
from pkglayer.prior import Prior
from pkglayer.scan import RACY_SECONDS
from tests.helpers import build_json, deb_package, dpkg_install, dpkg_root, pkglayer

# What differs between a build and the same build answered from its memo.
_OWN = ("seconds", "timings", "outputSeconds", "unchanged")


def _answer(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in _OWN}


def _tree(tmp_path: Path) -> Path:
    """A dpkg root with two real packages and a file of no package, older than the racy
    window (a build only keeps a memo of objects that old)."""
    root = dpkg_root(tmp_path / "root")
    one = deb_package(tmp_path, "one", "1.0", {"usr/share/one/file": b"one\n"})
    two = deb_package(tmp_path, "two", "1.0", {"usr/share/two/file": b"two\n"})
    dpkg_install(root, one, two)
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/site.conf").write_text("a = 1\n")
    time.sleep(RACY_SECONDS + 0.1)
    return root


def _memos() -> list[Path]:
    return sorted((Path(os.environ["XDG_CACHE_HOME"]) / "pkglayer/memos").glob("*.memo"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(path))
    return path


def _recorded(root: Path, *args: str) -> dict:
    """Build twice: the first writes the layers, the second finds them and keeps a memo."""
    first = build_json(root, *args)
    assert first["written"] > 0 and not first["unchanged"]
    second = build_json(root, *args)
    assert second["written"] == 0 and not second["unchanged"]
    return second


def test_an_unchanged_rebuild_is_answered_from_the_last_one(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path)
    out = f"oci:{tmp_path}/image:v1"
    second = _recorded(root, "--output", out)
    assert len(_memos()) == 1
    stamps = location_stamps([str(tmp_path / "image")])
    third = build_json(root, "--output", out)
    assert third["unchanged"] is True
    assert _answer(third) == _answer(second)
    assert third["reused"] == len(third["layers"]) and third["written"] == 0
    assert set(third["timings"]["steps"]) == set(second["timings"]["steps"])
    assert location_stamps([str(tmp_path / "image")]) == stamps  # nothing written, nothing replaced

    # The answer costs no pipeline: neither the build, the kept scan nor a package source
    # is imported (argparse lists --format's choices only when it needs them).
    code = (
        "import sys; from pkglayer.cli import main; code = main(sys.argv[1:]); "
        "loaded = [m for m in ('pkglayer.build', 'pkglayer.keptscan', 'pkglayer.sources') if m in sys.modules]; "
        "sys.stderr.write('\\nPIPELINE %s' % bool(loaded)); sys.exit(code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "build", str(root), "-q", "--output", out, "--json"],
        capture_output=True, text=True, check=True,
    )
    assert json.loads(proc.stdout)["unchanged"] is True
    assert proc.stderr.endswith("PIPELINE False")

    # The text answer says so, and lists the same layers as the build it repeats.
    built = pkglayer("build", root, "--output", out).stdout
    pkglayer("build", root, "--output", out)
    answered = pkglayer("build", root, "--output", out).stdout
    assert "(nothing changed since the last build)" in answered and "nothing changed" not in built
    assert [line for line in answered.splitlines() if line.startswith("reused")] == [
        line for line in built.splitlines() if line.startswith("reused")
    ]
    assert "image " + third["image"] in answered


def test_a_changed_tree_is_built_again(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path)
    layers = tmp_path / "layers"
    _recorded(root, "--layers", str(layers))
    # Same size and mtime: only the ctime tells the edit.
    conf = root / "etc/site.conf"
    st = conf.stat()
    conf.write_text("a = 2\n")
    os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = build_json(root, "--layers", str(layers))
    assert not after["unchanged"]
    assert [layer["name"] for layer in after["layers"] if not layer["reused"]] == ["unowned"]

    time.sleep(RACY_SECONDS + 0.1)
    build_json(root, "--layers", str(layers))  # keeps a memo again
    assert build_json(root, "--layers", str(layers))["unchanged"]
    # A package file edited with no package transaction.
    (root / "usr/share/two/file").write_bytes(b"TWO\n")
    after = build_json(root, "--layers", str(layers))
    assert not after["unchanged"]
    assert "modified" in [layer["name"] for layer in after["layers"] if not layer["reused"]]


def test_the_databases_paths_are_checked_once(tmp_path: Path, cache: Path) -> None:
    """The memo's trace leaves out the tree's own objects (their stamps are checked
    anyway, and say more), and keeps what the tree does not hold: the databases looked
    for and not found. An edit of a database file is then told by its stamp."""
    from pkglayer.fsutil import unseal

    root = _tree(tmp_path)
    layers = tmp_path / "layers"
    _recorded(root, "--layers", str(layers))
    [path] = _memos()
    recorded = unseal(memo_module._MAGIC, path.read_bytes(), "build memo", memo_module.MEMO_FORMAT)
    objects = set(recorded["paths"].split("\0"))
    assert "var/lib/dpkg/status" in objects and "var/lib/dpkg/info/one.list" in objects
    trace = recorded["trace"]
    assert trace and not set(trace) & objects
    assert trace.get("var/lib/rpm") is None and "var/lib/rpm" in trace  # looked for, absent
    assert build_json(root, "--layers", str(layers))["unchanged"]

    # dpkg's file list of a package rewritten in place: same size and mtime, a new ctime.
    listed = root / "var/lib/dpkg/info/one.list"
    st = listed.stat()
    listed.write_bytes(listed.read_bytes())
    os.utime(listed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not build_json(root, "--layers", str(layers))["unchanged"]


def test_a_child_checks_part_of_the_tree_and_what_it_finds_counts(tmp_path: Path, cache: Path, monkeypatch) -> None:
    """From _SPLIT_FROM objects on, a forked child lstats the last part of the tree: an
    edit there, or the child failing, means no answer."""
    from pkglayer.fsutil import unseal

    root = _tree(tmp_path)
    _recorded(root, "--layers", str(tmp_path / "layers"))
    [path] = _memos()
    recorded = unseal(memo_module._MAGIC, path.read_bytes(), "build memo", memo_module.MEMO_FORMAT)
    memo = BuildMemo(str(path.parent), recorded["key"], str(root), jobs=2)
    monkeypatch.setattr(memo_module, "_SPLIT_FROM", 1)
    children = []
    real = memo_module.Forked

    def forked(fn, *args, **kwargs):
        children.append(args[1])  # the paths the child checks
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(memo_module, "Forked", forked)
    assert memo.answer() is not None
    [theirs] = children
    assert 0 < len(theirs) < len(recorded["paths"].split("\0"))  # the rest were checked here
    # An edit of a file only the child looks at: same size and mtime, a new ctime.
    edited = root / next(p for p in reversed(theirs) if (root / p).is_file() and not (root / p).is_symlink())
    st = edited.stat()
    edited.write_bytes(edited.read_bytes())
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert memo.answer() is None
    assert len(children) == 2

    # A child that fails (here: cannot look) is no answer either, and leaves no process.
    root2 = _tree(tmp_path / "again")
    _recorded(root2, "--layers", str(tmp_path / "layers2"))
    [path] = [p for p in _memos() if p != Path(memo.path)]
    recorded = unseal(memo_module._MAGIC, path.read_bytes(), "build memo", memo_module.MEMO_FORMAT)
    memo = BuildMemo(str(path.parent), recorded["key"], str(root2), jobs=2)
    failing = []
    monkeypatch.setattr(memo_module, "Forked",
                        lambda fn, *args, **kwargs: failing.append(real(os._exit, 3)) or failing[0])
    assert memo.answer() is None
    [child] = failing
    assert child.pid is None  # reaped


def test_changed_outputs_settings_or_environment_are_built_again(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path)
    image = tmp_path / "image"
    out = f"oci:{image}:v1"
    second = _recorded(root, "--output", out)

    # A layer blob removed from the layout: written again.
    layer = second["layers"][0]["digest"]
    (image / "blobs/sha256" / layer.removeprefix("sha256:")).unlink()
    after = build_json(root, "--output", out)
    assert not after["unchanged"] and after["written"] == 1
    assert after["layers"][0]["digest"] == layer

    # The layout's index edited (the earlier image of the tag is the prior).
    build_json(root, "--output", out)
    assert build_json(root, "--output", out)["unchanged"]
    index = image / "index.json"
    index.write_text(index.read_text())
    assert not build_json(root, "--output", out)["unchanged"]

    # The same command line with another environment.
    build_json(root, "--output", out)
    assert build_json(root, "--output", out)["unchanged"]
    dated = build_json(root, "--output", out, env={"SOURCE_DATE_EPOCH": "1700000000"})
    assert not dated["unchanged"] and dated["written"] > 0

    # A configuration file edited in place.
    config = tmp_path / "pkglayer.toml"
    config.write_text('[build]\ncompression = "gzip"\n')
    _recorded(root, "--output", f"oci:{tmp_path}/other:v1", "--config", str(config))
    assert build_json(root, "--output", f"oci:{tmp_path}/other:v1", "--config", str(config))["unchanged"]
    config.write_text('[build]\ncompression = "zstd"\n')
    zstd = build_json(root, "--output", f"oci:{tmp_path}/other:v1", "--config", str(config))
    assert not zstd["unchanged"] and {layer["mediaType"] for layer in zstd["layers"]} == {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    }


def test_builds_with_inputs_that_cannot_be_stamped_keep_no_memo(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path)
    for args in (
        ("--output", f"oci:{tmp_path}/a:v1", "--no-hash-cache"),
        ("--output", f"oci:{tmp_path}/b:v1", "--no-memo"),
        ("--output", f"oci:{tmp_path}/c:v1", "--prior", f"oci:{tmp_path}/a:v1"),
        ("--output", f"oci-archive:{tmp_path}/d.tar"),
    ):
        for _ in range(3):
            assert not build_json(root, *args)["unchanged"]
    assert _memos() == []


def test_a_damaged_memo_is_ignored(tmp_path: Path, cache: Path) -> None:
    root = _tree(tmp_path)
    out = f"oci:{tmp_path}/image:v1"
    second = _recorded(root, "--output", out)
    (path,) = _memos()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    proc = pkglayer("build", root, "-q", "--json", "--output", out)
    assert "ignoring the build memo" in proc.stderr and "checksum mismatch" in proc.stderr
    again = json.loads(proc.stdout)
    assert not again["unchanged"] and _answer(again) == _answer(second)
    assert build_json(root, "--output", out)["unchanged"]  # a good memo was kept again

    # A FIFO in its place (or a symlink) is refused without blocking or following it.
    path.unlink()
    os.mkfifo(path)
    proc = pkglayer("build", root, "-q", "--json", "--output", out, timeout=120)
    assert "is not a regular file" in proc.stderr and not json.loads(proc.stdout)["unchanged"]


def test_no_memo_is_kept_of_objects_changed_within_the_racy_window(tmp_path: Path, cache: Path) -> None:
    """A change in the clock tick a scan reads an object in leaves its lstat as it was:
    such an object must be read again by the next build, so no memo vouches for it."""
    root = _tree(tmp_path)
    layers = tmp_path / "layers"
    settings = BuildSettings().validated()

    def kept_after_build():
        scans = LastKept(DiskScans.for_settings(settings))
        build(str(root), settings, Prior(), BlobDir(str(layers), create=True), scans=scans)
        return scans.last

    kept = kept_after_build()
    memo = BuildMemo(str(cache / "memos"), "k" * 64, str(root))
    answer = {"written": 0, "timings": {"steps": {}, "cpu": {}}}
    memo.record(answer, kept, [str(layers)], location_stamps([str(layers)]))
    assert Path(memo.path).exists()  # outside the window: kept
    Path(memo.path).unlink()
    newest = max(o.st.st_ctime_ns for o in kept.scan.objects.values())
    kept.scan.started = newest / 1e9 + RACY_SECONDS / 2
    memo.record(answer, kept, [str(layers)], location_stamps([str(layers)]))
    assert not Path(memo.path).exists()
    # Nor when the outputs changed while the build ran.
    kept.scan.started = newest / 1e9 + RACY_SECONDS + 1
    before = location_stamps([str(layers)])
    (layers / "extra").write_text("x")
    memo.record(answer, kept, [str(layers)], before)
    assert not Path(memo.path).exists()


def test_the_key_follows_pkglayers_own_code(tmp_path: Path, monkeypatch, cache: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "module.py").write_text("x = 1\n")
    monkeypatch.setattr(memo_module, "_CODE_DIR", str(code))
    from pkglayer.cli import _settings_from_args, make_parser

    args = make_parser().parse_args(["build", str(tmp_path), "--output", f"oci:{tmp_path}/o:v1"])
    settings = _settings_from_args(args)
    first = BuildMemo.for_build(args, settings)
    assert first is not None and BuildMemo.for_build(args, settings).key == first.key
    (code / "module.py").write_text("x = 2\n")
    assert BuildMemo.for_build(args, settings).key != first.key
    key = BuildMemo.for_build(args, settings).key
    monkeypatch.setenv("OLDPWD", "/elsewhere")  # a shell's own bookkeeping is not an input
    assert BuildMemo.for_build(args, settings).key == key
    monkeypatch.setenv("LC_ALL", "C.UTF-8")  # the rest of the environment is
    assert BuildMemo.for_build(args, settings).key != key


def test_an_output_entry_that_cannot_be_looked_at_is_never_vouched_for(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert location_stamps([str(tmp_path / "out")]) == location_stamps([str(tmp_path / "out")])
    assert location_stamps([str(tmp_path / "gone")]) == {str(tmp_path / "gone"): None}
    unlookable = str(tmp_path / ("x" * 300))  # ENAMETOOLONG: neither there nor absent
    assert location_stamps([unlookable]) != location_stamps([unlookable])
