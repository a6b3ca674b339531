"""Rootfs access never leaves the rootfs: chroot-style resolution, no-follow opens."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pkglayer.errors import RootfsError
from pkglayer.rootfs import FileOpener, Rootfs, noted, unchanged


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "usr/lib/libx.so").write_text("lib")
    (root / "etc/shadow").write_text("rootfs shadow")
    (root / "lib").symlink_to("usr/lib")
    (root / "abs").symlink_to("/etc/shadow")  # absolute: means the rootfs's own /etc
    (root / "up").symlink_to("../../../../../../etc/shadow")  # ".." stops at the root
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    return root


def test_resolution_has_chroot_semantics(tree: Path) -> None:
    with Rootfs(tree) as r:
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"
        assert r.resolve("abs") == "etc/shadow"
        assert r.resolve("up") == "etc/shadow"
        assert r.resolve("abs", follow_final=False) == "abs"
        assert r.read_bytes("abs") == b"rootfs shadow"
        assert r.read_bytes("up") == b"rootfs shadow"
        assert r.read_bytes("lib/libx.so") == b"lib"
        with pytest.raises(RootfsError, match="too many levels"):
            r.resolve("loop1")


def test_no_follow_open_refuses_links(tree: Path) -> None:
    with Rootfs(tree) as r:
        with pytest.raises(RootfsError, match="^/abs changed into a symlink while being read$"):
            r.open_fd("abs", resolve=False)
        with pytest.raises(RootfsError, match="^/lib/libx.so changed into a symlink while being read$"):
            r.open_fd("lib/libx.so", resolve=False)
        with pytest.raises(RootfsError, match="^/lib/libx.so changed into a symlink while being read$"):
            r.open("lib/libx.so", resolve=False)
        with r.open("lib/libx.so") as f:  # resolved by default, inside the rootfs
            assert f.read() == b"lib"
        with FileOpener(r) as opener:
            fd, st = opener.open_fd("usr/lib/libx.so")
            os.close(fd)
            assert st.st_size == 3
            # a directory swapped for a link after the walk is refused, not followed
            os.rename(tree / "usr/lib", tree / "usr/lib.real")
            (tree / "usr/lib").symlink_to("/etc")
            with FileOpener(r) as fresh, pytest.raises(RootfsError, match="symlink"):
                fresh.open_fd("usr/lib/libx.so")
            # the walk reads symlinks the same way: through the directory, never through a link
            (tree / "usr/lib.real/link").symlink_to("libx.so")
            with FileOpener(r) as links:
                assert links.readlink("usr/lib.real/link") == "libx.so"
                with pytest.raises(RootfsError, match="^/usr/lib/link changed into a symlink while being read$"):
                    links.readlink("usr/lib/link")


def test_missing_or_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(RootfsError, match="does not exist"):
        Rootfs(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RootfsError, match="not a directory"):
        Rootfs(tmp_path / "file")
    with pytest.raises(RootfsError) as e:  # another reason stat fails
        Rootfs(tmp_path / "file/sub")
    assert str(e.value) == f"rootfs {tmp_path}/file/sub: Not a directory"


def test_closing_twice_closes_nothing_else(tmp_path: Path) -> None:
    r = Rootfs(tmp_path)
    with r:
        pass
    spare = os.open(tmp_path, os.O_RDONLY)  # the lowest free descriptor: the one r had
    try:
        r.close()
        for fd in (0, 1, 2, spare):
            os.fstat(fd)  # still open
    finally:
        os.close(spare)


def test_resolution_of_dots_missing_parts_and_files_in_the_way(tree: Path) -> None:
    (tree / "usr/abs").symlink_to("/etc")
    (tree / "usr/rel").symlink_to("lib/../../etc")
    with Rootfs(tree) as r:
        assert r.resolve("") == r.resolve("/") == r.resolve(".") == ""
        assert r.resolve("./usr//./lib/") == "usr/lib"
        assert r.resolve("..") == r.resolve("../..") == ""
        assert r.resolve("usr/../etc/shadow") == "etc/shadow"
        assert r.resolve("usr/abs/shadow") == r.resolve("usr/rel/shadow") == "etc/shadow"
        # a missing component ends the resolution: the rest is taken as it is, normalised
        assert r.resolve("lib/none/../x/./y") == "usr/lib/x/y"
        assert r.resolve("none/../../lib") == "lib"
        # a file where a directory should be
        assert r.resolve("lib/libx.so/sub/../z") == "usr/lib/libx.so/z"
        # the final component kept as it is, or resolved when it is ".."
        assert r.resolve("lib/libx.so", follow_final=False) == "usr/lib/libx.so"
        assert r.resolve("lib", follow_final=False) == "lib"
        assert r.resolve("/lib/", follow_final=False) == "lib"
        assert r.resolve("lib/..", follow_final=False) == "usr"
        assert r.resolve("..", follow_final=False) == ""


def test_forty_links_resolve_and_forty_one_do_not(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "target").write_text("t")
    for i in range(41):
        (root / f"l{i}").symlink_to(f"l{i + 1}" if i < 40 else "target")
    with Rootfs(root) as r:
        assert r.resolve("l1") == "target"  # 40 links
        with pytest.raises(RootfsError, match="^too many levels of symbolic links in /l0$"):
            r.resolve("l0")


def test_opening_reading_and_listing(tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    (tree / "dangling").symlink_to("nothing")
    (tree / "usr/lib/sub").mkdir()
    with Rootfs(tree) as r:
        with pytest.raises(RootfsError, match="^cannot open the rootfs itself as a file$"):
            r.open_fd("/")
        with pytest.raises(RootfsError, match="^/usr/lib is not a regular file$"):
            r.open_fd("usr/lib")
        with pytest.raises(RootfsError, match="^/fifo is not a regular file$"):
            r.open_fd("fifo")  # and does not block on it
        with pytest.raises(FileNotFoundError):
            r.open_fd("usr/lib/none")
        with pytest.raises(FileNotFoundError):
            r.open_fd("dangling")
        with r.open("lib/libx.so") as f:
            assert f.read() == b"lib"
        assert r.read_bytes("abs", max_size=13) == b"rootfs shadow"
        with pytest.raises(RootfsError, match="^/abs is larger than 12 bytes$"):
            r.read_bytes("abs", max_size=12)
        assert r.exists("abs") and r.exists("lib") and r.exists("usr/lib/sub")
        assert not r.exists("dangling") and not r.exists("lib/none")
        assert r.is_file("abs") and r.is_file("lib/libx.so")
        assert not r.is_file("lib") and not r.is_file("dangling") and not r.is_file("fifo")
        assert r.listdir("lib") == ["libx.so", "sub"]
        assert r.listdir("") == sorted(os.listdir(tree))
        assert r.listdir("none") == r.listdir("lib/libx.so") == []
        assert r.readlink("abs") == "/etc/shadow" and r.readlink("usr/../lib") == "usr/lib"


def test_xattrs_of_the_object_itself(tree: Path) -> None:
    os.setxattr(tree / "usr/lib/libx.so", "user.a", b"1")
    os.setxattr(tree / "usr/lib/libx.so", "user.b", b"")
    with Rootfs(tree) as r:
        assert r.getxattrs("usr/lib/libx.so") == {"user.a": b"1", "user.b": b""}
        assert r.getxattrs("lib") == {}  # a link: its target's are not its own
        assert r.getxattrs("etc") == {}
        # a link's own (trusted.* may be set on one, by root), not its target's
        os.setxattr(tree / "usr/lib", "trusted.target", b"the directory")
        os.setxattr(tree / "lib", "trusted.which", b"the link", follow_symlinks=False)
        assert r.getxattrs("lib") == {"trusted.which": b"the link"}
        with pytest.raises(FileNotFoundError):  # gone: an error, not "no xattrs"
            r.getxattrs("usr/none")


def test_entries_of_a_changing_tree(tree: Path) -> None:
    """What the walk's listing does when others change the tree under it: entries come
    sorted by name, each lstat taken as it is reached; an entry gone before then is not
    part of the tree; a directory gone before it was listed is an error."""
    with Rootfs(tree) as r:
        listing = r.entries("")
        name, st = next(listing)
        assert name == "abs" and st.st_ino == os.lstat(tree / "abs").st_ino
        (tree / "loop1").unlink()  # a later sibling, listed already
        rest = [name for name, _ in listing]
        assert rest == ["etc", "lib", "loop2", "up", "usr"]
        os.rename(tree / "usr/lib", tree / "moved")
        with pytest.raises(RootfsError, match="^/usr/lib disappeared while being read$"):
            list(r.entries("usr/lib"))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_file_opener_keeps_a_few_directories_open(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = ["f", "a/f", "a/b/c/d/f", "a/b/x/f", "a/b/c/d/g", "e/f", "a/b/c/f"] + [f"m{i}/f" for i in range(40)]
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(p)
    (root / "a/link").symlink_to("b")
    with Rootfs(root) as r:
        base = _open_fds()
        for max_dirs in (0, 2, 3, 32):
            with FileOpener(r, max_dirs=max_dirs) as opener:
                for p in paths:
                    fd, st = opener.open_fd(p)
                    with os.fdopen(fd, "rb") as f:
                        assert f.read() == p.encode(), p
                    assert st.st_size == len(p)
                    assert _open_fds() <= base + max(2, max_dirs)
                with pytest.raises(RootfsError, match="^/a/link/c/f changed into a symlink while being read$"):
                    opener.open_fd("a/link/c/f")
                with pytest.raises(RootfsError, match="^/a/link changed into a symlink while being read$"):
                    opener.open_fd("a/link")
            assert _open_fds() == base


def _noted_file(path: Path) -> tuple:
    st = os.lstat(path)
    return ("f", st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _noted_dir(path: Path) -> tuple:
    st = os.lstat(path)
    return ("d", st.st_dev, st.st_ino)


def test_a_trace_notes_each_path_looked_up_with_what_was_found(tree: Path) -> None:
    with Rootfs(tree) as r:
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"  # not traced yet
        r.trace = {}
        assert r.read_bytes("lib/libx.so") == b"lib"  # resolved before: nothing new to note
        assert r.trace == {}
        assert r.resolve("usr/../lib/libx.so") == "usr/lib/libx.so"
        assert r.resolve("none/x") == "none/x"
        assert r.resolve("etc/shadow/x") == "etc/shadow/x"
        assert r.listdir("usr") == ["lib"]
        assert r.listdir("none") == []
        trace = r.trace
    assert trace == {
        # a directory passed through is noted by identity; one listed by its stat, as
        # its mtime changes with its entries
        "usr": _noted_file(tree / "usr"),
        "lib": _noted_file(tree / "lib"),
        "usr/lib": _noted_dir(tree / "usr/lib"),
        "usr/lib/libx.so": _noted_file(tree / "usr/lib/libx.so"),
        "none": None,
        "none/x": None,
        "etc": _noted_dir(tree / "etc"),
        "etc/shadow": _noted_file(tree / "etc/shadow"),
        "etc/shadow/x": None,
    }
    assert list(trace)[:2] == ["usr", "lib"]  # parents before what is looked up below them
    assert unchanged(str(tree), trace)


def test_noted_tells_files_and_directories_apart(tree: Path) -> None:
    assert noted(None) is None
    assert noted(os.lstat(tree / "usr")) == _noted_dir(tree / "usr")
    assert noted(os.lstat(tree / "usr"), listed=True) == _noted_file(tree / "usr")
    assert noted(os.lstat(tree / "lib"), listed=True) == noted(os.lstat(tree / "lib")) == _noted_file(tree / "lib")


@pytest.mark.parametrize(
    "change",
    [
        "edit a file read",  # same inode, new size and mtime
        "touch a file read",  # same size, new mtime and ctime
        "chmod a file read",  # ctime only
        "replace a file read",  # a new inode
        "remove a file read",
        "create a file found absent",
        "add an entry to a listed directory",
        "turn a directory passed through into a link",
    ],
)
def test_unchanged_sees_every_kind_of_change_to_a_traced_path(tree: Path, change: str) -> None:
    with Rootfs(tree) as r:
        r.trace = {}
        r.read_bytes("etc/shadow")
        r.resolve("etc/none")
        r.listdir("usr")
        r.read_bytes("usr/lib/libx.so")
        trace = dict(r.trace)
    assert unchanged(str(tree), trace)
    shadow = tree / "etc/shadow"
    if change == "edit a file read":
        shadow.write_text("a longer rootfs shadow")
    elif change == "touch a file read":
        st = os.stat(shadow)
        os.utime(shadow, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    elif change == "chmod a file read":
        shadow.chmod(0o600 if (shadow.stat().st_mode & 0o777) != 0o600 else 0o640)
    elif change == "replace a file read":
        (tree / "etc/shadow.new").write_text("rootfs shadow")
        os.rename(tree / "etc/shadow.new", shadow)
    elif change == "remove a file read":
        shadow.unlink()
    elif change == "create a file found absent":
        (tree / "etc/none").write_text("")
    elif change == "add an entry to a listed directory":
        (tree / "usr/share").mkdir()
    else:
        os.rename(tree / "usr/lib", tree / "usr/lib.real")
        (tree / "usr/lib").symlink_to("lib.real")
    assert not unchanged(str(tree), trace)


def test_unchanged_accepts_what_was_absent_and_stays_absent(tree: Path) -> None:
    # below a file, the lookup fails with ENOTDIR rather than ENOENT
    trace = {"none": None, "etc/shadow/x": None, "etc": _noted_dir(tree / "etc")}
    assert unchanged(str(tree), trace)
    (tree / "etc/other").write_text("")  # etc was passed through, not listed
    assert unchanged(str(tree), trace)


def test_stamp_identifies_a_files_content_through_links(tree: Path) -> None:
    with Rootfs(tree) as r:
        st = os.lstat(tree / "usr/lib/libx.so")
        assert r.stamp("lib/libx.so") == (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns,
                                          st.st_ctime_ns)
        assert r.stamp("lib/none") is None
        assert r.stat().st_ino == os.stat(tree).st_ino


def test_a_traced_stamp_of_a_symlink_is_its_targets(tree: Path) -> None:
    """A traced rootfs answers a stamp from the note of the path when it is no
    symlink; a symlink's own note is not its target's."""
    (tree / "usr/lib/libx.so.1").symlink_to("libx.so")
    st = os.lstat(tree / "usr/lib/libx.so")
    target = (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with Rootfs(tree) as r:
        r.trace = {}
        assert r.resolve("usr/lib/libx.so.1") == "usr/lib/libx.so"  # notes the link, then its target
        assert r.trace["usr/lib/libx.so.1"][0] == "f"
        assert r.stamp("usr/lib/libx.so.1") == r.stamp("lib/libx.so.1") == r.stamp("usr/lib/libx.so") == target


def test_known_notes_answer_lookups_and_are_noted_again(tree: Path, monkeypatch) -> None:
    """Notes known to hold (an earlier trace, less what the daemon's watch saw change)
    answer lookups without a system call, and go into the new trace as they are."""
    with Rootfs(tree) as r:
        r.trace = {}
        r.read_bytes("lib/libx.so")
        r.resolve("etc/none")
        earlier = dict(r.trace)
    lstats: list[str] = []
    real = os.lstat

    def counted(path, *args, **kwargs):
        lstats.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", counted)
    (tree / "etc/none").write_text("")  # the watch would name it: not among the known notes
    with Rootfs(tree) as r:
        r.trace = {}
        r.known = {p: n for p, n in earlier.items() if p != "etc/none"}
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"
        assert r.stamp("lib/libx.so") == earlier["usr/lib/libx.so"][1:]
        assert r.exists("etc/none")
        assert lstats == [f"{r.path}/etc/none"]
        again = {p: n for p, n in earlier.items() if p != "etc/none"}
        assert r.trace == {**again, "etc/none": noted(real(tree / "etc/none"))}


def test_resolutions_are_remembered_per_rootfs(tree: Path) -> None:
    with Rootfs(tree) as r:
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"
        (tree / "lib").unlink()
        (tree / "lib").symlink_to("etc")
        assert r.resolve("lib/libx.so") == "usr/lib/libx.so"  # remembered by this instance
    with Rootfs(tree) as r:
        assert r.resolve("lib/libx.so") == "etc/libx.so"  # not by the next one
