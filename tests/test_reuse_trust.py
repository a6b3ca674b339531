"""What a build takes from earlier builds is untrusted (issue 11, defects 2 and 7, and
the trust placed in history.json): published blobs never share a file that someone else
can write, sizes are compared before anything is hashed, and --verify-reused checks what
a reused blob really holds.

Runs as root: files are given to another owner, and that owner's writes are made by a
real process running as that user.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pkglayer.blobstore import BlobDir
from pkglayer.cli import main
from pkglayer.daemon.cache import LayerCache
from pkglayer.history import LayerRecord, load_history, save_history
from pkglayer.layout import open_layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="gives files to other owners: needs root")

OTHER = 4242  # a user that is not us


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_as(uid: int, path: Path, data: bytes) -> None:
    """The file's owner `uid` makes it writable and overwrites it, from a process running
    as that user (the file is handed over as an open fd: pytest's directories are 0700)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        code = ("import os,sys; fd=int(sys.argv[1]); os.fchmod(fd, 0o644); "
                "w=os.open(f'/proc/self/fd/{fd}', os.O_WRONLY|os.O_TRUNC); os.write(w, sys.argv[2].encode())")
        # The system python: the test interpreter may live where that user cannot go (/root).
        subprocess.run(["/usr/bin/python3", "-c", code, str(fd), data.decode()], pass_fds=[fd], check=True,
                       user=uid, group=uid)
    finally:
        os.close(fd)


def rchar() -> int:
    """Bytes this process has read through read(2) and friends, page cache included."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# ------------------------------------------------------------------ publishing


def test_an_import_links_only_a_file_nobody_else_can_write(tmp_path: Path) -> None:
    src = BlobDir(tmp_path / "input", create=True)
    ours, _ = src.add_bytes(b"written by us, read-only")  # 0444, our uid: shareable
    theirs, _ = src.add_bytes(b"moved in by another user")
    os.chown(src.path(theirs), OTHER, OTHER)
    loose, _ = src.add_bytes(b"ours but group-writable")
    os.chmod(src.path(loose), 0o664)

    out = BlobDir(tmp_path / "layout", create=True)
    for digest in (ours, theirs, loose):
        out.import_blob(src, digest)
        assert out.verify(digest)
        assert os.stat(out.path(digest)).st_mode & 0o777 == 0o444

    assert os.stat(out.path(ours)).st_ino == os.stat(src.path(ours)).st_ino
    for digest in (theirs, loose):
        assert os.stat(out.path(digest)).st_ino != os.stat(src.path(digest)).st_ino
        assert os.stat(out.path(digest)).st_uid == os.geteuid()

    write_as(OTHER, Path(src.path(theirs)), b"changed under its digest")
    Path(src.path(loose)).write_bytes(b"changed by a group member")
    assert out.verify(theirs) and out.verify(loose), "a write to input/ changed a published blob"


def _tree(root: Path, text: str) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text(text)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(text.encode() * 100)
    return root


def _build(*args: str) -> None:
    assert main(["build", *args, "--format", "none", "-q"]) == 0


def test_an_output_layout_never_shares_a_blob_with_input_someone_else_owns(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root", "hello")
    layers = tmp_path / "layers"
    _build(str(root), "--layers", str(layers))
    # The build system moves output/ to input/, as another user.
    (layers / "output").rename(layers / "input")
    inputs = list((layers / "input" / "blobs" / "sha256").iterdir())
    for blob in inputs:
        os.chown(blob, OTHER, OTHER)

    _build(str(root), "--layers", str(layers), "--output", f"oci:{tmp_path}/image:t")
    published = tmp_path / "image" / "blobs" / "sha256"
    for blob in inputs:
        assert (published / blob.name).exists(), "the layout holds every layer"
        assert os.stat(published / blob.name).st_ino != os.stat(blob).st_ino
        write_as(OTHER, blob, b"evil")
    image = open_layout(str(tmp_path / "image"), "t")
    for desc in image.layers:
        assert BlobDir(str(tmp_path / "image")).verify(desc.digest, desc.size)


def test_a_layout_blob_shared_with_a_writable_file_is_replaced_by_a_copy(tmp_path: Path) -> None:
    """A layout written by an older pkglayer may hold hard links into someone's input/."""
    root = _tree(tmp_path / "root", "hello")
    _build(str(root), "--output", f"oci:{tmp_path}/image:t")
    image = open_layout(str(tmp_path / "image"), "t")
    blob = Path(BlobDir(str(tmp_path / "image")).path(image.layers[0].digest))
    elsewhere = tmp_path / "someones-input"
    os.link(blob, elsewhere)
    os.chown(elsewhere, OTHER, OTHER)

    _build(str(root), "--output", f"oci:{tmp_path}/image:t")
    assert os.stat(blob).st_nlink == 1 and os.stat(blob).st_uid == os.geteuid()
    write_as(OTHER, elsewhere, b"evil")
    assert BlobDir(str(tmp_path / "image")).verify(image.layers[0].digest, image.layers[0].size)


def test_the_layer_cache_copies_a_blob_someone_swapped_into_an_output(tmp_path: Path) -> None:
    cache = LayerCache(str(tmp_path / "cache"), 1 << 30)
    out = BlobDir(tmp_path / "out", create=True)
    digest, size = out.add_bytes(b"a layer")
    os.chown(out.path(digest), OTHER, OTHER)  # not the file we wrote
    record = LayerRecord("x", (), "sha256:" + "1" * 64, digest, "sha256:" + "2" * 64, size,
                         "application/vnd.oci.image.layer.v1.tar+gzip", "gzip-6")
    cache.add(record, out)
    assert os.stat(cache.blobs.path(digest)).st_ino != os.stat(out.path(digest)).st_ino
    write_as(OTHER, Path(out.path(digest)), b"evil")
    assert cache.blobs.verify(digest, size)
    cache.close()


# ------------------------------------------------------------------ sizes first


def test_sizes_are_compared_before_anything_is_hashed(tmp_path: Path) -> None:
    src = BlobDir(tmp_path / "input", create=True)
    digest, size = src.add_bytes(b"the real blob")
    os.chmod(src.path(digest), 0o644)
    os.truncate(src.path(digest), 16 << 30)  # a 16 GiB sparse file under a wanted name
    out = BlobDir(tmp_path / "out", create=True)
    before = rchar()
    assert not src.verify(digest, size)
    with pytest.raises(Exception, match=f"is corrupt: it is {16 << 30} bytes, history says {size}"):
        out.import_blob(src, digest, size)
    assert rchar() - before < 1 << 20, "a size mismatch was found by reading the file"


def test_a_huge_blob_under_a_wanted_name_costs_a_build_nothing(tmp_path: Path) -> None:
    """Every blob directory a build looks in is checked by size before hashing: here the
    --prior layout, consulted first, holds a 16 GiB file under the layer's name."""
    root = _tree(tmp_path / "root", "hello")
    layers = tmp_path / "layers"
    _build(str(root), "--layers", str(layers), "--output", f"oci:{tmp_path}/prior:t")
    (layers / "output").rename(layers / "input")
    for blob in (layers / "input" / "blobs" / "sha256").iterdir():
        fake = tmp_path / "prior" / "blobs" / "sha256" / blob.name
        fake.unlink()
        with open(fake, "wb") as f:
            f.truncate(16 << 30)
    before = rchar()
    _build(str(root), "--layers", str(layers), "--prior", f"oci:{tmp_path}/prior:t",
           "--output", f"oci:{tmp_path}/image:t")
    assert rchar() - before < 64 << 20, "the build read the oversized blob"
    image = open_layout(str(tmp_path / "image"), "t")
    assert BlobDir(str(tmp_path / "image")).verify(image.layers[0].digest, image.layers[0].size)


def test_a_rebuild_reads_no_blob_its_records_vouch_for_and_reads_a_replaced_one(tmp_path: Path, capsys) -> None:
    """The blobs an unchanged rebuild reuses are checked from the digest cache's records
    (a stat each, without a worker thread); a blob file the records do not know, here a
    copy put under the same name, is read through and hashed, and still reused."""
    root = _tree(tmp_path / "root", "hello")
    (root / "usr" / "bin" / "big").write_bytes(os.urandom(4 << 20))  # a blob that cannot compress
    layers = tmp_path / "layers"
    _build(str(root), "--layers", str(layers))
    (layers / "output").rename(layers / "input")
    time.sleep(2.5)  # older than the digest cache's racy window, so its checks are remembered
    _build(str(root), "--layers", str(layers))  # the input blob is hashed once and remembered

    def rebuild() -> tuple[dict, int]:
        capsys.readouterr()
        before = rchar()
        assert main(["build", str(root), "--layers", str(layers), "--format", "none", "--json"]) == 0
        return json.loads(capsys.readouterr().out), rchar() - before

    result, read = rebuild()
    assert result["written"] == 0 and result["reused"] == len(result["layers"])
    assert read < 1 << 20, f"read {read} bytes: a vouched-for blob was read again"
    blob = max((layers / "input" / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    copy = blob.with_name("copy")
    copy.write_bytes(blob.read_bytes())
    copy.replace(blob)
    result, read = rebuild()
    assert result["written"] == 0 and result["reused"] == len(result["layers"])
    assert read >= 4 << 20, "the replaced blob was reused without being hashed"


# ------------------------------------------------------------------ --verify-reused


def _history(layers: Path):
    history = load_history(layers / "history.json")
    assert history is not None and len(history.layers) == 1
    return history


def _swapped_input(tmp_path: Path) -> tuple[Path, Path, LayerRecord]:
    """/layers for tree B whose history.json pairs B's content key with tree A's blob
    (digest, diff_id and size all A's, consistent with each other), A's blob in input/."""
    a, b = _tree(tmp_path / "a", "tree A"), _tree(tmp_path / "b", "tree B")
    la, lb = tmp_path / "la", tmp_path / "lb"
    _build(str(a), "--layers", str(la))
    _build(str(b), "--layers", str(lb))
    rec_a, rec_b = _history(la).layers[0], _history(lb).layers[0]
    forged = replace(rec_b, digest=rec_a.digest, diff_id=rec_a.diff_id, size=rec_a.size)
    save_history(lb / "history.json", replace(_history(lb), layers=(forged,)))
    (lb / "output").rename(lb / "input")
    os.link(la / "output" / "blobs" / "sha256" / rec_a.digest[7:], lb / "input" / "blobs" / "sha256" / rec_a.digest[7:])
    return b, lb, rec_a


def test_a_history_pairing_a_key_with_another_layers_blob_is_trusted_by_default(tmp_path: Path) -> None:
    """What docs/security.md says a swapped digest in history.json produces."""
    b, lb, rec_a = _swapped_input(tmp_path)
    _build(str(b), "--layers", str(lb))
    assert _history(lb).layers[0].digest == rec_a.digest, "tree B's image would hold tree A's layer"


def test_verify_reused_refuses_a_blob_that_does_not_hold_its_layer(tmp_path: Path, capsys) -> None:
    b, lb, rec_a = _swapped_input(tmp_path)
    capsys.readouterr()
    assert main(["build", str(b), "--layers", str(lb), "--format", "none", "--verify-reused", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["written"] == 1 and result["reused"] == 0
    assert any("does not hold the layer" in w for w in result["warnings"]), result["warnings"]
    assert _history(lb).layers[0].digest != rec_a.digest


def test_verify_reused_refuses_a_wrong_diff_id_and_remembers_what_it_checked(tmp_path: Path, capsys) -> None:
    root = _tree(tmp_path / "root", "hello")
    layers = tmp_path / "layers"
    _build(str(root), "--layers", str(layers))
    (layers / "output").rename(layers / "input")
    good = _history(layers)
    time.sleep(2.5)  # older than the digest cache's racy window, so its check is remembered

    def build(history) -> dict:
        save_history(layers / "history.json", history)
        capsys.readouterr()
        # --no-memo: the last build is forged below in the digest cache, which a build
        # memo does not stand for (the memo would answer: nothing it stamps changed).
        assert main(["build", str(root), "--layers", str(layers), "--format", "none", "--verify-reused",
                     "--json", "--no-memo"]) == 0
        return json.loads(capsys.readouterr().out)

    wrong = replace(good.layers[0], diff_id=sha(b"not this layer's tar"))
    assert build(replace(good, layers=(wrong,)))["reused"] == 0, "a wrong diff_id would make a broken image"
    assert build(good)["reused"] == 1

    cache = Path(os.environ["XDG_CACHE_HOME"]) / "pkglayer" / "file-digests.sqlite"
    with sqlite3.connect(cache) as db:
        rows = db.execute("SELECT digest FROM digests WHERE algo = 'layer-identity-v1'").fetchall()
        assert rows == [(f"{good.layers[0].digest} {good.layers[0].content_key} {good.layers[0].diff_id}",)]
        # Proof that the remembered check is what the next build uses: make it say otherwise.
        db.execute("UPDATE digests SET digest = 'forged' WHERE algo = 'layer-identity-v1'")
    assert build(good)["reused"] == 0
