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
import random
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
    """Run a command, return its stdout; on failure raise with the tails of its stderr and
    stdout. kwargs go to subprocess.run (cwd, env, timeout, input). The tests' one `run`
    (tests/helpers.py re-exports it); it lives here because this module must stand alone."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    out: str = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\nstderr:\n{proc.stderr[-6000:]}\nstdout:\n{out[-2000:]}"
        )
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
    """Convert one .deb into exactly one .rpm; return an error message instead of raising."""
    with tempfile.TemporaryDirectory(prefix="pkglayer-alien-") as work:
        try:
            run(["alien", "-k", "--to-rpm", "--scripts", deb], cwd=work)
        except RuntimeError as exc:
            return str(exc)
        rpms = list(Path(work).glob("*.rpm"))
        if len(rpms) != 1:
            return f"alien made {len(rpms)} rpms: {sorted(p.name for p in rpms)}"
        shutil.move(rpms[0], outdir / rpms[0].name)
    return None


def alien_rpms() -> Path:
    """The minbase .debs converted to RPMs, one each. All 88 convert on bookworm; a
    failure stops the build rather than leave the rpm trees a package short."""
    debs = deb_debs()

    def build(dest: Path) -> None:
        sources = sorted(debs.glob("*.deb"))
        log(f"alien: converting {len(sources)} debs on 2 workers (~20 s)")
        with ThreadPoolExecutor(max_workers=2) as pool:
            errors = list(pool.map(lambda d: _alien(d, dest), sources))
        failed = [f"{d.name}: {e}" for d, e in zip(sources, errors, strict=True) if e]
        if failed:
            raise RuntimeError(f"alien failed on {len(failed)} of {len(sources)} debs:\n" + "\n".join(failed))

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


# ------------------------------------------------------------------- pacman

PKGBUILDS_DIR = Path(__file__).resolve().parent / "pkgbuilds"
PACMAN_PKGS_RECIPE = "pacman-pkgs.v2"
PACMAN_ROOTFS_RECIPE = "pacman-rootfs.v1"
PACMAN_UPGRADED_RECIPE = "pacman-upgraded.v1"
PACMAN_DBPATH = "var/lib/pacman"
PACMAN_TOOLS = ("pacman", "makepkg", "repo-add", "bsdtar", "fakeroot", "runuser")

# (PKGBUILD directory, epoch, pkgver, pkgrel, SOURCE_DATE_EPOCH: file mtimes and
# %BUILDDATE%); pkgver/pkgrel of the split package are fixed in its PKGBUILD.
PACMAN_BUILDS = (
    ("pkglayer-hello", "0", "1.0", "1", 1700000000),
    ("pkglayer-hello", "1", "1.1", "1", 1710000000),
    ("pkglayer-split", None, None, None, 1690000000),
)
# What each root's repository offers: the old and the new state of one upgrade.
PACMAN_REPO = "repo"


def _pkgbuild_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(PKGBUILDS_DIR.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(PKGBUILDS_DIR)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


# makepkg records its build and start directories in .BUILDINFO: one fixed place (under
# a lock) keeps the packages byte-identical from one build to the next.
MAKEPKG_WORKDIR = Path("/tmp/pkglayer-makepkg")


def _makepkg(pkgbuild_dir: Path, outdir: Path, env: dict[str, str]) -> None:
    """Run makepkg as `nobody` (it refuses root) on a copy of pkgbuild_dir."""
    with open(f"{MAKEPKG_WORKDIR}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        work = MAKEPKG_WORKDIR
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700)
        try:
            shutil.copytree(pkgbuild_dir, work / "src")
            (work / "out").mkdir()
            run(["chown", "-R", "nobody:nogroup", work])
            build_env = {
                "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                "LC_ALL": "C",
                "HOME": str(work),
                "BUILDDIR": str(work / "build"),
                "PKGDEST": str(work / "out"),
                "SRCDEST": str(work / "src"),
                # makepkg asks pacman for the host's installed packages (for .BUILDINFO);
                # the host has no pacman database, and the list does not matter here.
                "PACMAN": "true",
                **env,
            }
            run(["runuser", "-u", "nobody", "--", "makepkg", "--nodeps", "--noconfirm", "--noprogressbar"],
                cwd=work / "src", env=build_env)
            for pkg in (work / "out").glob("*.pkg.tar.*"):
                shutil.copy2(pkg, outdir / pkg.name)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def pacman_packages() -> Path:
    """Real pacman packages built by makepkg from tests/pkgbuilds (deterministically:
    SOURCE_DATE_EPOCH), plus a repository (`repo/`, made by repo-add) offering
    pkglayer-hello 1.0-1 and the split pkglayer-split-{lib,tools} 2.0-3."""

    def build(dest: Path) -> None:
        for directory, epoch, pkgver, pkgrel, built in PACMAN_BUILDS:
            env = {"SOURCE_DATE_EPOCH": str(built)}
            if pkgver is not None:
                env |= {"PKGLAYER_EPOCH": epoch or "0", "PKGLAYER_PKGVER": pkgver,
                        "PKGLAYER_PKGREL": pkgrel or "1"}
            _makepkg(PKGBUILDS_DIR / directory, dest, env)
        repo = dest / PACMAN_REPO
        repo.mkdir()
        offered = [dest / "pkglayer-hello-1.0-1-x86_64.pkg.tar.gz",
                   *sorted(dest.glob("pkglayer-split-*.pkg.tar.gz"))]
        for pkg in offered:
            shutil.copy2(pkg, repo / pkg.name)
        run(["repo-add", "--quiet", repo / "pkglayer.db.tar.gz", *sorted(repo.glob("*.pkg.tar.gz"))])

    return cached(f"{PACMAN_PKGS_RECIPE}-{_pkgbuild_digest()}", build)


def pacman(root: Path, *args: str) -> str:
    """pacman on root with every path inside root (the host has no pacman setup)."""
    return run([
        "pacman", "--root", root, "--dbpath", root / PACMAN_DBPATH,
        "--config", root / "etc/pacman.conf", "--cachedir", root / "var/cache/pacman/pkg",
        "--logfile", root / "var/log/pacman.log", "--hookdir", root / "etc/pacman.d/hooks",
        "--gpgdir", root / "etc/pacman.d/gnupg", *args,
    ])


def pacman_versions(root: Path) -> dict[str, str]:
    """Installed packages of a pacman tree: name -> [epoch:]pkgver-pkgrel."""
    return dict(line.split(" ", 1) for line in pacman(root, "-Q").splitlines())


def _build_pacman_rootfs(dest: Path, pkgs: Path) -> None:
    for d in ("etc/pacman.d/hooks", PACMAN_DBPATH, "var/log", "var/cache/pacman/pkg"):
        (dest / d).mkdir(parents=True)
    # The packages are not signed, and there is no keyring: signature checks off.
    (dest / "etc/pacman.conf").write_text(
        "[options]\nArchitecture = x86_64\nSigLevel = Never\nLocalFileSigLevel = Never\n\n"
        f"[pkglayer]\nServer = file://{pkgs / PACMAN_REPO}\n"
    )
    # As a user would: sync the repository, install by name (split-lib comes in as a
    # dependency); pacman keeps the sync db and the downloaded packages.
    pacman(dest, "-Sy", "--noconfirm", "--noprogressbar", "pkglayer-hello", "pkglayer-split-tools")


def pacman_rootfs() -> Path:
    """pkglayer-hello 1.0-1 and pkglayer-split-{lib,tools} 2.0-3 installed by pacman -S
    into an otherwise empty root. Read-only."""
    pkgs = pacman_packages()
    return cached(f"{PACMAN_ROOTFS_RECIPE}+{pkgs.name}", lambda dest: _build_pacman_rootfs(dest, pkgs))


def pacman_upgrade_pair() -> UpgradePair:
    """pacman_rootfs and a copy with pkglayer-hello upgraded to 1:1.1-1 by pacman -U."""
    old, pkgs = pacman_rootfs(), pacman_packages()

    def build(dest: Path) -> None:
        copy_tree(old, dest)
        pacman(dest, "-U", "--noconfirm", "--noprogressbar",
               str(pkgs / "pkglayer-hello-1:1.1-1-x86_64.pkg.tar.gz"))

    new = cached(f"{PACMAN_UPGRADED_RECIPE}+{old.name}", build)
    return UpgradePair(old, new, diff_versions(pacman_versions(old), pacman_versions(new)))


# ---------------------------------------------------------------------- pip

PIP_WHEELS_RECIPE = "pip-wheels.v1"
PIP_ROOTFS_RECIPE = "deb-pip.v1"
PIP_UPGRADED_RECIPE = "deb-pip-upgraded.v1"
# Small pure-Python wheels from PyPI, pinned by hash. six is also a Debian package
# (python3-six 1.16.0), idna gets upgraded, pyflakes installs a console script.
PIP_WHEELS = {
    "six-1.17.0-py2.py3-none-any.whl": "4721f391ed90541fddacab5acf947aa0d3dc7d27b2e1e8eda2be8970586c3274",
    "idna-3.7-py3-none-any.whl": "82fee1fc78add43492d3a1898bfa6d8a904cc97d8427f683ed8e798d07761aa0",
    "idna-3.10-py3-none-any.whl": "946d195a0d259cbba61165e88e65941f16e9b36ea6ddb97f00452bae8b1287d3",
    "pyflakes-3.2.0-py2.py3-none-any.whl": "84b5be138a2dfbb40689ca07e2152deb896a65c3a3e24c251c5c62489568074a",
}
PIP_SYSTEM = ("six==1.17.0", "idna==3.7", "pyflakes==3.2.0")  # into /usr/local
PIP_VENV = "/opt/app/venv"
PIP_VENV_PACKAGES = ("six==1.17.0",)
PIP_UPGRADE = "idna==3.10"


def _download_wheels(dest: Path, wheels: dict[str, str]) -> None:
    """Wheels (file name -> sha256) downloaded from PyPI by the test interpreter's pip
    (cp311 manylinux ones match bookworm's Python), hashes checked."""
    for wheel, sha256 in wheels.items():
        name, version = wheel.split("-")[:2]
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-cache-dir",
             "--only-binary", ":all:", "--dest", dest, f"{name}=={version}"])
        got = hashlib.sha256((dest / wheel).read_bytes()).hexdigest()
        if got != sha256:
            raise RuntimeError(f"{wheel}: sha256 {got}, expected {sha256}")


def pip_wheels() -> Path:
    """PIP_WHEELS downloaded from PyPI by the test interpreter's pip, hashes checked."""
    return cached(PIP_WHEELS_RECIPE, lambda dest: _download_wheels(dest, PIP_WHEELS))


def _pip(root: Path, *args: str, python: str | None = None) -> str:
    """Debian's own pip in the root, as a Dockerfile would run it (on the environment
    of `python` when given)."""
    target = ("--python", python) if python else ()
    return _chroot(root, "python3", "-m", "pip", "--no-cache-dir", "--disable-pip-version-check",
                   *target, *args)


def _pip_install(root: Path, wheels: Path, *args: str, python: str | None = None) -> None:
    """pip install from the local wheels only."""
    staged = root / "tmp/pkglayer-wheels"
    shutil.copytree(wheels, staged)
    try:
        _pip(root, "install", "--no-index", "--find-links", "/tmp/pkglayer-wheels", *args, python=python)
    finally:
        shutil.rmtree(staged)


def _install_pip_packages(dest: Path, wheels: Path) -> None:
    _chroot(dest, "apt-get", "install", "-y", "--no-install-recommends",
            "python3-pip", "python3-venv", "python3-six")
    _chroot(dest, "apt-get", "clean")
    # PEP 668: Debian's pip refuses the system environment without this flag; it
    # installs into /usr/local/lib/python3.11/dist-packages, scripts into /usr/local/bin.
    _pip_install(dest, wheels, "--break-system-packages", *PIP_SYSTEM)
    _chroot(dest, "python3", "-m", "venv", "--without-pip", PIP_VENV)
    _pip_install(dest, wheels, *PIP_VENV_PACKAGES, python=f"{PIP_VENV}/bin/python")


def pip_rootfs() -> Path:
    """deb_base plus Debian's python3-pip, python3-venv and python3-six (1.16.0), and
    wheels installed by that pip: six 1.17.0, idna 3.7 and pyflakes 3.2.0 into
    /usr/local, six 1.17.0 into the venv /opt/app/venv. Read-only."""
    base, wheels = deb_base(), pip_wheels()
    return cached(
        f"{PIP_ROOTFS_RECIPE}+{base.name}",
        lambda dest: _derive_deb(base, dest, lambda d: _install_pip_packages(d, wheels)),
    )


def pip_versions(root: Path) -> dict[str, str]:
    """Distributions pip installed in root's system environment: name -> version
    (read by the root's own pip)."""
    out = _pip(root, "list", "--format", "freeze", "--path", "/usr/local/lib/python3.11/dist-packages")
    return dict(line.split("==", 1) for line in out.splitlines())


def pip_upgrade_pair() -> UpgradePair:
    """pip_rootfs and a copy where `pip install --upgrade idna==3.10` ran."""
    old, wheels = pip_rootfs(), pip_wheels()

    def build(dest: Path) -> None:
        copy_tree(old, dest)
        _pip_install(dest, wheels, "--break-system-packages", "--upgrade", PIP_UPGRADE)

    new = cached(f"{PIP_UPGRADED_RECIPE}+{old.name}", build)
    return UpgradePair(old, new, diff_versions(pip_versions(old), pip_versions(new)))


# -------------------------------------------------------------- application

APP_WHEELS_RECIPE = "app-wheels.v1"
APP_ROOTFS_RECIPE = "deb-app.v1"
APP_UPGRADED_RECIPE = "deb-app-upgraded.v1"
# A web application's requirements (Flask, requests) plus numpy, from PyPI.
APP_WHEELS = {
    "blinker-1.8.2-py3-none-any.whl": "1779309f71bf239144b9399d06ae925637cf6634cf6bd131104184531bf67c01",
    "certifi-2024.8.30-py3-none-any.whl": "922820b53db7a7257ffbda3f597266d435245903d80737e34f8a45ff3e3230d8",
    "charset_normalizer-3.3.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
        "753f10e867343b4511128c6ed8c82f7bec3bd026875576dfd88483c5c73b2fd8",
    "click-8.1.7-py3-none-any.whl": "ae74fb96c20a0277a1d615f1e4d73c8414f5a98db8b799a7931d1582f3390c28",
    "flask-3.0.3-py3-none-any.whl": "34e815dfaa43340d1d15a5c3a02b8476004037eb4840b34910c6e21679d288f3",
    "idna-3.10-py3-none-any.whl": "946d195a0d259cbba61165e88e65941f16e9b36ea6ddb97f00452bae8b1287d3",
    "itsdangerous-2.2.0-py3-none-any.whl": "c6242fc49e35958c8b15141343aa660db5fc54d4f13a1db01a3f5891b98700ef",
    "jinja2-3.1.4-py3-none-any.whl": "bc5dd2abb727a5319567b7a813e6a2e7318c39f4f487cfe6c89c6f9c7d25197d",
    "MarkupSafe-2.1.5-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
        "b91c037585eba9095565a3556f611e3cbfaa42ca1e865f7b8015fe5c7336d5a5",
    "numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl":
        "666dbfb6ec68962c033a450943ded891bed2d54e6755e35e5835d63f4f6931d5",
    "requests-2.32.3-py3-none-any.whl": "70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc6",
    "urllib3-2.2.2-py3-none-any.whl": "a448b2f64d686155468037e1ace9f2d2199776e17f0a46610480d311f73e3472",
    "urllib3-2.2.3-py3-none-any.whl": "ca899ca043dcb1bafa3e262d73aa25c465bfb49e0bd9dd5d59f1d0acba2f8fac",
    "werkzeug-3.0.4-py3-none-any.whl": "02c9eb92b7d6c06f31a782811505d2157837cea66aaede3e217c7c27c039476c",
}
APP_REQUIREMENTS = (
    "flask==3.0.3", "requests==2.32.3", "urllib3==2.2.2", "numpy==1.26.4", "werkzeug==3.0.4", "jinja2==3.1.4",
    "markupsafe==2.1.5", "itsdangerous==2.2.0", "click==8.1.7", "blinker==1.8.2", "certifi==2024.8.30",
    "charset-normalizer==3.3.2", "idna==3.10",
)
APP_VENV = "/opt/venv"
APP_DIR = "opt/app"
APP_MODEL = "srv/models/model.bin"
APP_UPGRADE = "urllib3==2.2.3"
_APP_SOURCE = """\
from flask import Flask, render_template
import numpy
import requests

app = Flask(__name__)


@app.route("/")
def index():
    weights = numpy.fromfile("/srv/models/model.bin", dtype=numpy.uint8, count=1024)
    return render_template("index.html", checksum=int(weights.sum()), agent=requests.utils.default_user_agent())
"""


def app_wheels() -> Path:
    return cached(APP_WHEELS_RECIPE, lambda dest: _download_wheels(dest, APP_WHEELS))


def _install_app(dest: Path, wheels: Path) -> None:
    """What a Dockerfile for a Python service does: a venv with the requirements, the
    application copied in, a model file beside it."""
    _chroot(dest, "apt-get", "install", "-y", "--no-install-recommends", "python3-pip", "python3-venv")
    _chroot(dest, "apt-get", "clean")
    _chroot(dest, "python3", "-m", "venv", "--without-pip", APP_VENV)
    _pip_install(dest, wheels, *APP_REQUIREMENTS, python=f"{APP_VENV}/bin/python")
    app = dest / APP_DIR
    (app / "templates").mkdir(parents=True)
    (app / "app.py").write_text(_APP_SOURCE)
    (app / "templates/index.html").write_text("<p>{{ checksum }} {{ agent }}</p>\n")
    _chroot(dest, f"{APP_VENV}/bin/python", "-m", "compileall", "-q", f"/{APP_DIR}")
    (dest / APP_MODEL).parent.mkdir(parents=True)
    (dest / APP_MODEL).write_bytes(random.Random(13).randbytes(8 << 20))


def app_rootfs() -> Path:
    """deb_base plus Debian's python3-pip and python3-venv; a venv /opt/venv with
    APP_REQUIREMENTS installed from PyPI wheels by that pip; a Flask application in
    /opt/app; an 8 MiB model in /srv/models. Read-only."""
    base, wheels = deb_base(), app_wheels()
    return cached(
        f"{APP_ROOTFS_RECIPE}+{base.name}",
        lambda dest: _derive_deb(base, dest, lambda d: _install_app(d, wheels)),
    )


def app_upgrade_pair() -> UpgradePair:
    """app_rootfs and a copy where pip upgraded urllib3 2.2.2 -> 2.2.3 in the venv."""
    old, wheels = app_rootfs(), app_wheels()

    def build(dest: Path) -> None:
        copy_tree(old, dest)
        _pip_install(dest, wheels, "--upgrade", APP_UPGRADE, python=f"{APP_VENV}/bin/python")

    new = cached(f"{APP_UPGRADED_RECIPE}+{old.name}", build)

    def versions(root: Path) -> dict[str, str]:
        out = _pip(root, "list", "--format", "freeze", python=f"{APP_VENV}/bin/python")
        return dict(line.split("==", 1) for line in out.splitlines())

    return UpgradePair(old, new, diff_versions(versions(old), versions(new)))


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
