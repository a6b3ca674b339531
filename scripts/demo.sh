#!/usr/bin/env bash
# End-to-end demo on a real Debian rootfs, as root:
#   set up -> debootstrap minbase bookworm (cached) -> scan -> build an OCI image
#   -> build again (every layer reused) -> and again (answered from the memo)
#   -> run a command in the image with podman.
# Everything it writes goes under $PKGLAYER_DEMO_DIR (default /var/tmp/pkglayer-demo),
# except the rootfs, which is the test suite's cached minbase tree when
# tests/rootfs_factory.py is there (under $PKGLAYER_TEST_CACHE).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PKGLAYER_VENV:-$repo/.venv}
demo=${PKGLAYER_DEMO_DIR:-/var/tmp/pkglayer-demo}
pkglayer=$venv/bin/pkglayer
py=$venv/bin/python

step() { printf '\n=== %s\n' "$*"; }
show() { printf '+ %s\n' "$*"; "$@"; }

step "set-up"
"$repo/scripts/setup.sh"
mkdir -p "$demo"

step "root filesystem: debootstrap --variant=minbase bookworm (cached)"
if [[ -f $repo/tests/rootfs_factory.py ]]; then
    # The factory builds it once (under a lock) and prints the cached path.
    rootfs=$("$py" - "$repo/tests/rootfs_factory.py" <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rootfs_factory", sys.argv[1])
factory = sys.modules["rootfs_factory"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(factory)
print(factory.deb_base())
EOF
)
else
    rootfs=$demo/rootfs
    if [[ ! -f $rootfs/var/lib/dpkg/status ]]; then
        rm -rf "$rootfs.tmp"
        show debootstrap --variant=minbase bookworm "$rootfs.tmp" http://deb.debian.org/debian
        mv "$rootfs.tmp" "$rootfs"
    fi
fi
echo "rootfs: $rootfs ($(du -sh "$rootfs" | cut -f1))"

step "pkglayer scan (summary)"
"$pkglayer" scan "$rootfs" --json >"$demo/scan.json"
"$py" - "$demo/scan.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
c = s["counts"]
print(f"format {s['format']}, architecture {s['architecture']}: {c['packages']} packages, "
      f"{c['objects']} objects, {c['modified']} modified, {c['unowned']} unowned, "
      f"{c['excluded']} excluded, {c['missing']} listed but absent")
print("largest packages:")
for p in sorted(s["packages"], key=lambda p: -p["bytes"])[:8]:
    print(f"  {p['key']:<40} {p['files']:>6} files {p['bytes'] / 1e6:>8.1f} MB")
for home, v in s["homes"].items():
    print(f"  [{home}]{'':<{38 - len(home)}} {v['files']:>6} files {v['bytes'] / 1e6:>8.1f} MB")
print(f"(full report: {sys.argv[1]})")
EOF

# Start from an empty image and /layers directory so the first build writes everything.
rm -rf "$demo/image" "$demo/layers"
build=("$pkglayer" build "$rootfs" --output "oci:$demo/image:latest" --layers "$demo/layers")

step "first build: every layer written"
show "${build[@]}" --quiet

step "second build: every layer reused from $demo/layers"
"${build[@]}" --json >"$demo/rebuild.json"
"$py" - "$demo/rebuild.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
total = len(r["layers"])
print(f"{total} layers: {r['written']} written, {r['reused']} reused, {r['seconds']} s")
print(f"image {r['image']} manifest {r['manifestDigest']}")
if r["reused"] != total:
    sys.exit("demo: expected every layer to be reused on an unchanged rootfs")
EOF

step "third build: nothing changed since the second, which wrote nothing: answered from its memo"
"${build[@]}" --json >"$demo/again.json"
"$py" - "$demo/rebuild.json" "$demo/again.json" <<'EOF'
import json, sys
before, again = (json.load(open(path)) for path in sys.argv[1:])
print(f"unchanged: {again['unchanged']}, {again['seconds']} s (the second build: {before['seconds']} s)")
if not again["unchanged"] or again["manifestDigest"] != before["manifestDigest"]:
    sys.exit("demo: expected the third build to be answered from the second's memo, with its image")
EOF

step "run the image with podman (vfs storage under $demo/podman, runc, no network)"
podman=(podman --root "$demo/podman/root" --runroot "$demo/podman/runroot"
    --storage-driver vfs --cgroup-manager cgroupfs --events-backend file --runtime runc)
# shellcheck disable=SC2016  # $PRETTY_NAME is expanded inside the container
show "${podman[@]}" run --rm --quiet --network none \
    --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
    "oci:$demo/image:latest" \
    sh -c '. /etc/os-release && echo "hello from $PRETTY_NAME" && echo "$(dpkg-query -W | wc -l) packages installed" && ls -ld /tmp /usr/bin/passwd'
# Drop the vfs copy of the image: each run would otherwise keep another full tree.
"${podman[@]}" rmi --all --force >/dev/null 2>&1 || true

step "done: image in $demo/image, layers and history.json in $demo/layers"
