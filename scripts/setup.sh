#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine for pkglayer, as root:
#   1. the Debian packages the tool, its tests, the demo and the benchmark call;
#   2. .venv (Python 3.11) with pkglayer installed editable (compat mode) plus its test extras.
# Re-running is cheap: apt runs only when a package is missing, pip only when
# pyproject.toml changed since the last successful install.
#
# Environment:
#   PYTHON          interpreter for the venv (default: python3 on PATH); must be 3.11,
#                   because the PyPI `rpm` shim loads Debian's python3-rpm bindings,
#                   which are built for Debian 12's Python 3.11 only.
#   PKGLAYER_VENV   venv directory (default: REPO/.venv)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PKGLAYER_VENV:-$repo/.venv}
python=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Command -> package, for the record:
#   rpm, rpmbuild: rpm     | python bindings: python3-rpm | alien: alien (deb -> rpm)
#   debootstrap            | umoci, skopeo, oci-image-tool, buildah: OCI clients in tests
#   podman, runc           | docker-registry: local registry for push tests
#   pigz: benchmark baseline | zstd: benchmark baseline, and tests read layers back with it | getcap/setcap: libcap2-bin | getfattr/setfattr: attr
#   fakeroot               | newuidmap: uidmap (podman/buildah) | ca-certificates: https
#   db5.3_load: db5.3-util (test of an old Berkeley DB rpm database)
#   systemd-analyze: systemd (the daemon's unit file is verified by a test)
#   pacman, makepkg, repo-add: pacman-package-manager, makepkg; bsdtar (makepkg): libarchive-tools
#   ostree: a real ostree repository in the bootc test image
packages=(
    python3-rpm rpm alien debootstrap
    umoci skopeo podman buildah runc oci-image-tool docker-registry
    pigz zstd tar libcap2-bin attr fakeroot uidmap ca-certificates db5.3-util systemd
    pacman-package-manager makepkg libarchive-tools ostree
)

[[ $(id -u) -eq 0 ]] || die "run as root (apt-get, debootstrap, chroot and podman need it)"
[[ -r /etc/debian_version ]] || die "this script expects Debian 12 (bookworm)"

# --- Debian packages -------------------------------------------------------
missing=()
for pkg in "${packages[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}" </dev/null
else
    say "Debian packages: all ${#packages[@]} present"
fi

# --- Python virtualenv -----------------------------------------------------
command -v "$python" >/dev/null || die "no '$python' on PATH; set PYTHON=/path/to/python3.11"
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[[ $version == 3.11 ]] || die "$python is Python $version, need 3.11: Debian 12's python3-rpm \
bindings exist only for 3.11 and the PyPI 'rpm' shim loads them by minor version. \
Point PYTHON at a 3.11 interpreter (e.g. 'pyenv install 3.11' or PYTHON=/usr/bin/python3 \
after 'apt-get install python3-venv')."

if [[ -x $venv/bin/python ]] &&
    ! "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    say "$venv is not Python 3.11: recreating it"
    rm -rf "$venv"
fi
if [[ ! -x $venv/bin/python ]]; then
    say "creating $venv with $(command -v "$python") ($("$python" --version 2>&1))"
    "$python" -m venv "$venv"
fi

# Reinstall only when pyproject.toml or the install mode changed (the stamp holds their
# hash). Editable in setuptools' compat mode: a .pth line that puts the checkout on
# sys.path. The default mode's import hook loads pathlib and importlib.util at every
# interpreter start, 13-16 ms of every pkglayer command (a tenth of an unchanged rebuild).
mode=editable_mode=compat
stamp=$venv/.pkglayer-setup-stamp
want=$( (cat "$repo/pyproject.toml"; echo "$mode") | sha256sum | cut -d' ' -f1)
if [[ ! -f $stamp || $(<"$stamp") != "$want" ]]; then
    say "pip install -e '${repo}[test]' --config-settings $mode"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "${repo}[test]" \
        --config-settings "$mode"
    echo "$want" >"$stamp"
else
    say "pkglayer already installed in $venv (pyproject.toml unchanged)"
fi

# The rpm shim fails quietly at install time and loudly at import: check now.
"$venv/bin/python" -c 'import rpm; print("setup: rpm bindings", rpm.__version__)' ||
    die "the venv cannot import rpm: is python3-rpm installed for Python 3.11?"
"$venv/bin/pkglayer" --version >/dev/null || die "$venv/bin/pkglayer does not run"
say "done"
