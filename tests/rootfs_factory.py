"""Real root filesystems for the tests and benchmarks, built once and cached.

Every tree lives under ``$PKGLAYER_TEST_CACHE`` (default ``/var/cache/pkglayer-tests``)
in a directory named after its recipe version and the names of the trees it was derived
from, so bumping one recipe rebuilds everything downstream of it. A tree is built in a
hidden temporary sibling and renamed into place only when complete, under a per-tree
``flock`` so concurrent pytest processes build it once. Cached trees are shared: never
modify one; ``copy_tree`` it first. Building needs root and network access to
deb.debian.org.

Usable as ``tests.rootfs_factory`` or loaded by path.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
RPM_DBPATH = "/usr/lib/sysimage/rpm"
SPECS_DIR = Path(__file__).resolve().parent / "specs"

# Recipe versions: bump one when its recipe changes. Derived trees embed their
# parents' cache names, so a bump here also rebuilds everything built from it.
DEB_BASE_RECIPE = "deb-base.v2"
DEBS_RECIPE = "debs.v1"
DEB_ROOTFS_RECIPE = "deb-rootfs.v1"
DEB_UPGRADED_RECIPE = "deb-upgraded.v1"
ALIEN_RECIPE = "alien-rpms.v1"
SYNTH_RECIPE = "synth-rpms.v1"
RPM_ROOTFS_RECIPE = "rpm-rootfs.v1"
RPM_UPGRADED_RECIPE = "rpm-upgraded.v1"
LARGE_DEB_RECIPE = "deb-large.v2"
LARGE_DEB_UPGRADED_RECIPE = "deb-large-upgraded.v1"
BOOTC_RECIPE = "bootc-rootfs.v1"

# The benchmark wants 300-600 MB (du -sh; the tree keeps debootstrap's .debs and
# lists). Measured on bookworm: minbase 206 MB; this set 536 MB, 140 packages;
# + git 597 MB and g++ instead of gcc 632 MB, too close to or over the ceiling.
LARGE_DEB_INCLUDE = ("gcc", "python3", "perl")

# Synthetic RPMs built for every RPM tree: (spec stem, version, release).
SYNTH_PACKAGES = (
    ("pkglayer-demo", "1.0", "1"),
    ("pkglayer-demo", "1.0", "2"),
    ("pkglayer-extra", "1.0", "1"),
)

_CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LC_ALL": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}


@dataclass(frozen=True)
class UpgradePair:
    """Two cached trees that differ by a package upgrade."""

    old: Path
    new: Path
    # name -> (old version, new version); None where the package is absent.
    upgraded: dict[str, tuple[str | None, str | None]]


# ---------------------------------------------------------------- plumbing


def log(msg: str) -> None:
    print(f"[rootfs_factory] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    root = Path(os.environ.get("PKGLAYER_TEST_CACHE", "/var/cache/pkglayer-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def run(cmd: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    """Run a command, return its stdout; on failure raise with the output's tail."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    out: str = proc.stdout
    if proc.returncode != 0:
        tail = (out + proc.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return out


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """Return cache_root()/name, building it with build(tmpdir) if absent.

    build() fills an empty temporary directory next to the final one, which is then
    renamed into place: a killed build leaves only a hidden ``.NAME.tmp-*`` that the
    next builder (holding the lock) deletes.
    """
    root = cache_root()
    dest = root / name
    if dest.is_dir():
        return dest
    lock_dir = root / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {name}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_dir():
            return dest
        for stale in root.glob(f".{name}.tmp-*"):
            log(f"removing leftover of an interrupted build: {stale}")
            shutil.rmtree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        # mkdtemp makes 0700; a rootfs top directory is 0755.
        tmp.chmod(0o755)
        log(f"building {name} ...")
        start = time.monotonic()
        try:
            build(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.rename(tmp, dest)
        log(f"built {name} in {time.monotonic() - start:.1f} s")
    return dest


def copy_tree(src: Path, dst: Path) -> None:
    """Copy a rootfs keeping owners, modes, xattrs (capabilities), hard links and
    device nodes; reflinks where the filesystem can. dst must be absent or empty."""
    run(["cp", "-a", "--reflink=auto", "-T", src, dst])


def _installed_dpkg(root: Path) -> list[dict[str, str]]:
    """Top-level fields of each installed package in var/lib/dpkg/status."""
    packages = []
    text = (root / "var/lib/dpkg/status").read_text(encoding="utf-8")
    for para in text.split("\n\n"):
        fields = {
            key: value.strip()
            for key, _, value in (
                line.partition(":") for line in para.splitlines() if line and not line[0].isspace()
            )
        }
        if fields.get("Status", "").endswith(" installed"):
            packages.append(fields)
    return packages


def dpkg_versions(root: Path) -> dict[str, str]:
    """Installed packages of a Debian tree: name -> version."""
    return {p["Package"]: p["Version"] for p in _installed_dpkg(root)}


def rpm_query(root: Path, *args: str) -> str:
    """Run ``rpm -q ARGS`` against root's database without touching root.

    Any open of an sqlite rpmdb rewrites rpmdb.sqlite-shm, so the query runs on a
    throwaway copy of the database directory.
    """
    with tempfile.TemporaryDirectory(prefix="pkglayer-rpmq-") as scratch:
        shutil.copytree(root / RPM_DBPATH.lstrip("/"), Path(scratch) / RPM_DBPATH.lstrip("/"))
        return run(["rpm", "--root", scratch, "--dbpath", RPM_DBPATH, "-q", *args])


def rpm_versions(root: Path) -> dict[str, str]:
    """Installed packages of an RPM tree: name -> EVR."""
    out = rpm_query(root, "-a", "--qf", "%{NAME} %{EVR}\n")
    return dict(line.split(" ", 1) for line in out.splitlines())


def diff_versions(
    old: dict[str, str], new: dict[str, str]
) -> dict[str, tuple[str | None, str | None]]:
    return {
        name: (old.get(name), new.get(name))
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    }


# ------------------------------------------------------------------ Debian


def _chroot(root: Path, *cmd: str) -> str:
    # apt and dpkg work here without /proc or /dev mounts, so nothing is mounted
    # and nothing can be left mounted by a killed build.
    return run(["chroot", root, *cmd], env=_CHROOT_ENV)


def _debootstrap(dest: Path, include: Sequence[str] = ()) -> None:
    cmd = ["debootstrap", "--variant=minbase"]
    if include:
        cmd.append("--include=" + ",".join(include))
    log(f"debootstrap {SUITE} into {dest} (~25 s for minbase)")
    run([*cmd, SUITE, dest, MIRROR], env={**os.environ, "LC_ALL": "C"})


def _build_deb_base(dest: Path) -> None:
    _debootstrap(dest)
    # Security is configured but not fetched: the tree stays at point-release
    # versions, exactly as debootstrap left it apart from this file.
    (dest / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\ndeb {SECURITY_MIRROR} {SUITE}-security main\n"
    )


def _derive_deb(base: Path, dest: Path, change: Callable[[Path], None]) -> None:
    """Copy base to dest and run change(dest) with fresh apt lists.

    Afterwards base's lists go back in place (and apt's binary caches of the fresh
    ones go), so dest differs from base only by what change() installed plus dpkg's
    and apt's own state and logs. It also keeps ~90 MB of lists out of the tree.
    """
    copy_tree(base, dest)
    _chroot(dest, "apt-get", "update", "-o", "Acquire::Languages=none")
    change(dest)
    lists = dest / "var/lib/apt/lists"
    shutil.rmtree(lists)
    copy_tree(base / "var/lib/apt/lists", lists)
    for index in (dest / "var/cache/apt").glob("*.bin"):
        index.unlink()


def deb_base() -> Path:
    """debootstrap minbase bookworm, bookworm-security in sources.list but not applied."""
    return cached(DEB_BASE_RECIPE, _build_deb_base)


def deb_debs() -> Path:
    """The .debs debootstrap downloaded for deb_base (input of the RPM recipe)."""
    base = deb_base()

    def build(dest: Path) -> None:
        for deb in sorted((base / "var/cache/apt/archives").glob("*.deb")):
            shutil.copy2(deb, dest / deb.name)

    return cached(f"{DEBS_RECIPE}+{base.name}", build)


def deb_rootfs() -> Path:
    """deb_base plus iputils-ping, whose /usr/bin/ping carries security.capability."""
    base = deb_base()

    def install_ping(dest: Path) -> None:
        # .deb archives carry no xattrs: iputils-ping's postinst runs setcap, which
        # comes from libcap2-bin (a Depends). Without it ping falls back to setuid.
        _chroot(dest, "apt-get", "install", "-y", "--no-install-recommends", "iputils-ping")
        caps = run(["getcap", dest / "usr/bin/ping"])
        if "cap_net_raw" not in caps:
            raise RuntimeError(f"usr/bin/ping lacks cap_net_raw after install: {caps!r}")

    return cached(
        f"{DEB_ROOTFS_RECIPE}+{base.name}", lambda dest: _derive_deb(base, dest, install_ping)
    )


def _upgrade_set(root: Path, package: str) -> list[str]:
    """Packages apt would touch to upgrade only `package` (simulated)."""
    out = _chroot(root, "apt-get", "-s", "install", "--only-upgrade", "-y", package)
    return [line.split()[1] for line in out.splitlines() if line.startswith("Inst ")]


def _pick_security_upgrade(root: Path) -> str:
    """The upgradable package whose upgrade touches the fewest packages, preferring
    libraries, then the smallest one."""
    listing = _chroot(root, "apt", "list", "--upgradable")
    candidates = [line.split("/", 1)[0] for line in listing.splitlines() if "/" in line]
    if not candidates:
        raise RuntimeError(f"no {SUITE}-security upgrades available for {root}")
    sizes = {p["Package"]: int(p.get("Installed-Size", "0")) for p in _installed_dpkg(root)}

    touched = {name: _upgrade_set(root, name) for name in candidates}

    def rank(name: str) -> tuple[int, bool, int]:
        return (len(touched[name]), not name.startswith("lib"), sizes.get(name, 0))

    choice = min(candidates, key=rank)
    log(f"upgradable: {', '.join(candidates)}; chose {choice}, touching {touched[choice]}")
    return choice


def deb_upgrade_pair() -> UpgradePair:
    """deb_base and a copy with one bookworm-security upgrade applied."""
    base = deb_base()

    def upgrade_one(dest: Path) -> None:
        package = _pick_security_upgrade(dest)
        _chroot(dest, "apt-get", "install", "-y", "--only-upgrade", package)

    new = cached(
        f"{DEB_UPGRADED_RECIPE}+{base.name}", lambda dest: _derive_deb(base, dest, upgrade_one)
    )
    return UpgradePair(base, new, diff_versions(dpkg_versions(base), dpkg_versions(new)))


def build_large_deb_rootfs(dest: Path, include: Sequence[str] = LARGE_DEB_INCLUDE) -> None:
    """debootstrap minbase plus `include` into dest (absent or empty)."""
    dest.mkdir(exist_ok=True)
    _debootstrap(dest, include)


def large_deb_rootfs() -> Path:
    """Cached benchmark tree (300-600 MB); not used by the normal test run."""
    return cached(LARGE_DEB_RECIPE, build_large_deb_rootfs)


def large_deb_upgrade_pair() -> UpgradePair:
    """The benchmark tree and a copy with every bookworm-security upgrade applied
    (`apt-get upgrade`, as a rebuild of the image would). Not used by the test run."""
    base = large_deb_rootfs()

    def upgrade(dest: Path) -> None:
        copy_tree(base, dest)
        (dest / "etc/apt/sources.list").write_text(
            f"deb {MIRROR} {SUITE} main\ndeb {SECURITY_MIRROR} {SUITE}-security main\n"
        )
        _chroot(dest, "apt-get", "update", "-o", "Acquire::Languages=none")
        _chroot(dest, "apt-get", "upgrade", "-y")
        _chroot(dest, "apt-get", "clean")
        shutil.rmtree(dest / "var/lib/apt/lists")
        copy_tree(base / "var/lib/apt/lists", dest / "var/lib/apt/lists")
        for index in (dest / "var/cache/apt").glob("*.bin"):
            index.unlink()

    new = cached(f"{LARGE_DEB_UPGRADED_RECIPE}+{base.name}", upgrade)
    return UpgradePair(base, new, diff_versions(dpkg_versions(base), dpkg_versions(new)))


# --------------------------------------------------------------------- RPM


def _rpm(root: Path, *args: str) -> str:
    # Debian's rpm defaults %_dbpath to ~/.rpmdb and refuses to install without
    # --force-debian; always name both.
    return run(["rpm", "--root", root, "--dbpath", RPM_DBPATH, *args])


def build_rpm(spec: Path, version: str, release: str, outdir: Path) -> Path:
    """Build spec at version-release into outdir; return the .rpm path.

    Deterministic: file mtimes and build time come from the spec's %changelog, so
    rebuilding gives byte-identical packages.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pkglayer-rpmbuild-") as topdir:
        defines = {
            "_topdir": topdir,
            "_rpmdir": str(outdir),
            # %% keeps the tags unexpanded until each (sub)package is written
            "_build_name_fmt": "%%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm",
            "pkg_version": version,
            "pkg_release": release,
            "source_date_epoch_from_changelog": "1",
            "clamp_mtime_to_source_date_epoch": "1",
            "use_source_date_epoch_as_buildtime": "1",
            "_buildhost": "pkglayer.invalid",
        }
        argv = ["rpmbuild", "-bb", "--quiet"]
        for key, value in defines.items():
            argv += ["--define", f"{key} {value}"]
        run([*argv, spec])
    name = spec.stem
    (rpm,) = outdir.glob(f"{name}-{version}-{release}.*.rpm")
    return rpm


def _spec_digest() -> str:
    # Spec edits change the synthetic packages; key their cache on the specs' bytes.
    h = hashlib.sha256()
    for spec in sorted(SPECS_DIR.glob("*.spec")):
        h.update(spec.name.encode() + b"\0" + spec.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def synthetic_rpms() -> Path:
    """pkglayer-demo 1.0-1 and 1.0-2, pkglayer-extra 1.0-1."""

    def build(dest: Path) -> None:
        for stem, version, release in SYNTH_PACKAGES:
            build_rpm(SPECS_DIR / f"{stem}.spec", version, release, dest)

    return cached(f"{SYNTH_RECIPE}-{_spec_digest()}", build)


def _alien(deb: Path, outdir: Path) -> str | None:
    """Convert one .deb; return an error message instead of raising."""
    with tempfile.TemporaryDirectory(prefix="pkglayer-alien-") as work:
        try:
            run(["alien", "-k", "--to-rpm", "--scripts", deb], cwd=work)
        except RuntimeError as exc:
            return str(exc)
        for rpm in Path(work).glob("*.rpm"):
            shutil.move(rpm, outdir / rpm.name)
    return None


def alien_rpms() -> Path:
    """The minbase .debs converted to RPMs (all 88 convert on bookworm)."""
    debs = deb_debs()

    def build(dest: Path) -> None:
        sources = sorted(debs.glob("*.deb"))
        log(f"alien: converting {len(sources)} debs on 2 workers (~20 s)")
        with ThreadPoolExecutor(max_workers=2) as pool:
            errors = list(pool.map(lambda d: _alien(d, dest), sources))
        failed = [f"{d.name}: {e}" for d, e in zip(sources, errors, strict=True) if e]
        for line in failed:
            log(f"alien skipped {line}")
        if len(failed) > len(sources) // 10:
            raise RuntimeError(f"alien failed on {len(failed)} of {len(sources)} debs")

    return cached(f"{ALIEN_RECIPE}+{debs.name}", build)


def _build_rpm_rootfs(dest: Path, alien: Path, synth: Path) -> None:
    # Fedora layout: merged /usr (the debs still ship /bin, /lib; rpm installs
    # through these symlinks), database in usr/lib/sysimage/rpm, var/lib/rpm a link.
    for d in ("bin", "sbin", "lib", "lib64"):
        (dest / "usr" / d).mkdir(parents=True, exist_ok=True)
        (dest / d).symlink_to(f"usr/{d}")
    (dest / "var/lib").mkdir(parents=True)
    (dest / "var/lib/rpm").symlink_to("../../usr/lib/sysimage/rpm")
    _rpm(dest, "--initdb")
    _rpm(
        dest,
        "-i",
        "--nodeps",
        "--noscripts",
        "--ignorearch",
        "--force-debian",
        *map(str, sorted(alien.glob("*.rpm"))),
    )
    # Our packages go in with real dependency checks; --excludedocs leaves the
    # demo's %doc file listed in the database but absent on disk.
    _rpm(
        dest,
        "-i",
        "--excludedocs",
        "--force-debian",
        str(synth / "pkglayer-demo-1.0-1.noarch.rpm"),
        str(synth / "pkglayer-extra-1.0-1.noarch.rpm"),
    )
    caps = run(["getcap", dest / "usr/bin/pkglayer-ping"])
    if "cap_net_raw" not in caps:
        raise RuntimeError(f"usr/bin/pkglayer-ping lacks cap_net_raw: {caps!r}")
    if (dest / "root/.rpmdb").exists():
        raise RuntimeError("rpm wrote a database to root/.rpmdb: --dbpath was ignored")


def rpm_rootfs() -> Path:
    """Converted minbase RPMs plus pkglayer-demo-1.0-1 and pkglayer-extra-1.0-1."""
    alien, synth = alien_rpms(), synthetic_rpms()
    return cached(
        f"{RPM_ROOTFS_RECIPE}+{alien.name}+{synth.name}",
        lambda dest: _build_rpm_rootfs(dest, alien, synth),
    )


def rpm_upgrade_pair() -> UpgradePair:
    """rpm_rootfs and a copy with pkglayer-demo upgraded to 1.0-2 by rpm -U."""
    old, synth = rpm_rootfs(), synthetic_rpms()

    def build(dest: Path) -> None:
        copy_tree(old, dest)
        _rpm(
            dest,
            "-U",
            "--excludedocs",
            "--force-debian",
            str(synth / "pkglayer-demo-1.0-2.noarch.rpm"),
        )

    new = cached(f"{RPM_UPGRADED_RECIPE}+{old.name}", build)
    return UpgradePair(old, new, diff_versions(rpm_versions(old), rpm_versions(new)))


# ------------------------------------------------------------ bootc / ostree

# Where rpm-ostree has kept the rpm database: usr/share/rpm (Fedora CoreOS and
# bootc images before rpm 4.17's move) or usr/lib/sysimage/rpm (newer Fedora).
BOOTC_RPMDB_LOCATIONS = ("usr/lib/sysimage/rpm", "usr/share/rpm")
BOOTC_REF = "pkglayer/bootc"


def _build_bootc_rootfs(dest: Path, rpm_root: Path, rpmdb: str) -> None:
    # Stage the rpm root with its database where the variant wants it, commit it into
    # a real ostree repository at sysroot/ostree/repo, and check it out over dest with
    # hard links into that repository, which is how an ostree-container image holds
    # its content. ostree stores no mtimes: every checked-out file has mtime 0.
    stage = dest.parent / f"{dest.name}.stage"
    copy_tree(rpm_root, stage)
    try:
        if rpmdb != RPM_DBPATH.lstrip("/"):
            (stage / rpmdb).parent.mkdir(parents=True, exist_ok=True)
            os.rename(stage / RPM_DBPATH.lstrip("/"), stage / rpmdb)
            (stage / "var/lib/rpm").unlink()
            (stage / "var/lib/rpm").symlink_to(os.path.relpath(stage / rpmdb, stage / "var/lib"))
        repo = dest / "sysroot/ostree/repo"
        repo.parent.mkdir(parents=True)
        run(["ostree", f"--repo={repo}", "init", "--mode=bare"])
        run(["ostree", f"--repo={repo}", "commit", f"--branch={BOOTC_REF}", f"--tree=dir={stage}",
             "--timestamp=1970-01-01T00:00:00Z", "--subject=pkglayer test bootc tree"])
        run(["ostree", f"--repo={repo}", "checkout", "--union", "--require-hardlinks", BOOTC_REF, dest])
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    (dest / "ostree").symlink_to("sysroot/ostree")


def bootc_rootfs(rpmdb: str = "usr/lib/sysimage/rpm") -> Path:
    """rpm_rootfs as a bootc image's tree holds it: its content committed into a real
    ostree repository at sysroot/ostree/repo (made with Debian's ostree tool), checked
    out over the tree with hard links into the repository, ``ostree -> sysroot/ostree``,
    the rpm database at `rpmdb` (one of BOOTC_RPMDB_LOCATIONS; var/lib/rpm links to it).
    Read ostree_commit() for the commit. Never run ostree on the cached tree itself:
    even a read takes a lock file in the repository."""
    if rpmdb not in BOOTC_RPMDB_LOCATIONS:
        raise ValueError(f"rpmdb must be one of {BOOTC_RPMDB_LOCATIONS}, not {rpmdb!r}")
    base = rpm_rootfs()
    variant = rpmdb.replace("/", "-")
    return cached(
        f"{BOOTC_RECIPE}-{variant}+{base.name}", lambda dest: _build_bootc_rootfs(dest, base, rpmdb)
    )


def ostree_commit(root: Path) -> str:
    """The checksum of the commit a bootc_rootfs tree holds (read from the ref file)."""
    return (root / "sysroot/ostree/repo/refs/heads" / BOOTC_REF).read_text().strip()
