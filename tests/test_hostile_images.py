"""Source images whose metadata is hostile or broken (issue 11, defects 1, 5, 6 and 8),
through the command line as a user meets them: every case is one `pkglayer: error:` line
naming the layer and the path, exit status 1, nothing written to the output and the
working tree removed. The cases are the ones from the issue; tests/test_properties.py
searches the space around them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import tarcraft
from tests.helpers import PKGLAYER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking keeps owners: needs root")

F = tarcraft.member


def sparse_1_0(claimed: int) -> bytes:
    """A GNU PAX 1.0 sparse member: 512 bytes stored, `claimed` bytes when expanded."""
    data = tarcraft.pad(b"1\n0\n512\n") + b"A" * 512
    return F("GNUSparseFile.0/f", data=data, records={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                                      "GNU.sparse.name": "f", "GNU.sparse.realsize": str(claimed)})


CASES = {
    # (members, what the error says after "layer 0 (sha256:...): ")
    "mtime-40-digits": ([F("f", data=b"x", records={"mtime": "1" * 40})], "/f: mtime 1111111111111111111111111"),
    "mtime-infinite": ([F("f", data=b"x", records={"mtime": "1e999"})], "/f: PAX mtime '1e999'"),
    "uid-negative-pax": ([F("f", data=b"x", records={"uid": "-5"})], "/f: PAX uid '-5'"),
    "uid-2^40": ([F("f", data=b"x", records={"uid": str(2**40)})], "/f: uid 1099511627776 is out of range"),
    "gid-negative-base256": ([F("f", data=b"x", gid=-7)], "/f: gid -7 is out of range"),
    "mode-negative": ([F("f", data=b"x", mode=-1)], "/f: mode"),
    "size-negative": ([F("f", size=-512)], "after /etc: 'f' has a negative size"),
    "size-pax-absurd": ([F("f", data=b"x", records={"size": str(10**30)})], "/f: PAX size"),
    "device-major-2^40": ([F("dev/x", b"3", devmajor=2**40)], "/dev/x: device number 1099511627776,0"),
    "symlink-with-nul": ([F("l", b"2", records={"linkpath": "a\0b"})], "/l: link target"),
    "xattr-unknown-namespace": ([F("f", data=b"x", records={"SCHILY.xattr.bogus.name": "v"})],
                                "/f: cannot set extended attribute 'bogus.name'"),
    "component-too-long": ([F("d/" + "y" * 300, data=b"x")], "has a component longer than 255 bytes"),
    "pax-length-5000-digits": ([tarcraft.header("././@PaxHeader", b"x", size=5010)
                                + tarcraft.pad(b"9" * 5000 + b" a=b\n"), F("f", data=b"x")],
                               "after /etc: malformed tar header at offset 512: Exceeds the limit (4300 digits)"),
    "pax-header-chain": ([tarcraft.pax({"comment": "x"}) * 3000 + F("f", data=b"x")],
                         "after /etc: more than 8 extended headers in a row"),
    "invalid-header-mid-stream": ([F("f", data=b"x"), b"\1" * 512, F("g", data=b"y")],
                                  "after /f: invalid tar header at offset 1536"),
    "gnu-sparse": ([tarcraft.header("s", b"S", size=512, raw={483: tarcraft.number(8 << 30, 12)}) + b"A" * 512],
                   "'s' is a GNU sparse member; refusing it"),
    "pax-sparse-8GiB": ([sparse_1_0(8 << 30)], "PAX sparse member; refusing it"),
    "unknown-type": ([F("f", b"Z", data=b"x")], "/f: unsupported tar entry type"),
}


def _build(tmp_path: Path, layers: list[bytes], *args: str, config: dict | None = None):
    layout = tarcraft.layout(tmp_path / "img", layers, config=config)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    proc = subprocess.run(
        [*PKGLAYER, "build", "--from", f"oci:{layout}:t", "--tmpdir", str(work), *args],
        capture_output=True, text=True,
    )
    return proc, work


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_metadata_is_one_line_naming_layer_and_path(tmp_path: Path, case: str) -> None:
    members, message = CASES[case]
    layer = tarcraft.stream([F("etc", b"5", mode=0o755), *members])
    proc, work = _build(tmp_path, [layer], "--output", f"oci:{tmp_path}/out")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("pkglayer: error: layer 0 (sha256:"), lines[0]
    assert message in lines[0], lines[0]
    assert os.listdir(work) == [] and not (tmp_path / "out").exists()


def test_what_unpacking_writes_is_counted_against_the_size_limit(tmp_path: Path) -> None:
    """Stored bytes are few; written bytes are what counts: here three files of 400 kB."""
    layer = tarcraft.stream([F(f"f{i}", data=b"\0" * 400_000) for i in range(3)])
    proc, work = _build(tmp_path, [layer], "--output", f"oci:{tmp_path}/out", "--max-image-size", "1M")
    assert proc.returncode == 1
    assert "layer 0 (sha256:" in proc.stderr and "/f2: size 400000 is more than the limit" in proc.stderr
    assert os.listdir(work) == []


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_tmpdir_is_an_error_naming_layer_path_and_place(tmp_path: Path, small_tmpfs: Path) -> None:
    layer = tarcraft.stream([F("usr", b"5", mode=0o755), F("usr/big", data=os.urandom(2 << 20))])
    layout = tarcraft.layout(tmp_path / "img", [layer])
    proc = subprocess.run(
        [*PKGLAYER, "build", "--from", f"oci:{layout}:t", "--tmpdir", str(small_tmpfs),
         "--output", f"oci:{tmp_path}/out"], capture_output=True, text=True,
    )
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("pkglayer: error: layer 0 (sha256:"), proc.stderr
    assert "/usr/big: No space left on device (writing to " in line and str(small_tmpfs) in line
    assert os.listdir(small_tmpfs) == []


@pytest.mark.parametrize("config, message", [
    ({"architecture": "../../x\n"}, "config architecture '../../x\\n' is not a valid OCI platform value"),
    ({"variant": "v8\u00e9"}, "config variant"),
    ({"config": {"Labels": {"k": "\udc80"}}}, "source image config: a string is not valid Unicode"),
    ({"config": {"Labels": {"": "empty key"}}}, "Labels key '' is empty"),
    ({"config": {"Env": ["\x01X=1"]}}, "Env key"),
])
def test_config_strings_are_checked_before_anything_is_written(tmp_path: Path, config: dict, message: str) -> None:
    layer = tarcraft.stream([F("etc", b"5", mode=0o755), F("etc/x", data=b"x")])
    layers = tmp_path / "layers"
    proc, work = _build(tmp_path, [layer], "--layers", str(layers), config=config)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not (layers / "output").exists() and not (layers / "history.json").exists()
    assert os.listdir(work) == []


def test_a_source_date_epoch_out_of_range_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "x").write_text("x")
    proc = subprocess.run([*PKGLAYER, "build", str(root), "--format", "none", "--output", f"oci:{tmp_path}/out"],
                          capture_output=True, text=True, env={**os.environ, "SOURCE_DATE_EPOCH": "99999999999999"})
    assert proc.returncode == 1 and proc.stderr.startswith("pkglayer: error: source-date-epoch must be between")
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()
