"""Image references of every transport the containers tools know, and moving images
between them and OCI layouts.

pkglayer itself reads and writes OCI layouts only (layout.py); skopeo does every other
transport, so containers-storage (the local podman/buildah store, with its
`storage.conf`), archives and registries behave exactly as with the containers tools:

    oci:DIR[:TAG]
    docker://[HOST/]NAME[:TAG][@DIGEST]
    containers-storage:[DRIVER@ROOT+RUNROOT:OPTIONS]NAME[:TAG]
    oci-archive:PATH[:TAG]          PATH "-": standard output (output only)
    docker-archive:PATH[:NAME:TAG]

An OCI archive is a tar of an OCI layout. pkglayer writes it itself (skopeo cannot
write to a pipe, and a tar of sorted names with fixed times is reproducible), which is
what makes `pkglayer build ... --output oci-archive:- | podman load` work.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import sys
from dataclasses import dataclass

from .blobstore import BlobDir
from .errors import PkglayerError
from .fsutil import Workspace, unlink_quiet
from .layout import (
    DEFAULT_LIMITS,
    OCI_LAYOUT,
    REF_NAME,
    REF_RE,
    Image,
    Limits,
    canonical_json,
    check_bytes,
    image_from_manifest,
    open_layout,
    parse_layout_ref,
)
from .mediatypes import OCI_MANIFEST
from .registry import RegistryError, RegistryOptions, fetch_image, parse_docker_ref, push, skopeo

log = logging.getLogger(__name__)

OCI = "oci"
DOCKER = "docker"
STORAGE = "containers-storage"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
PREFIXES = ((DOCKER, "docker://"), (STORAGE, "containers-storage:"), (OCI_ARCHIVE, "oci-archive:"),
             (DOCKER_ARCHIVE, "docker-archive:"), (OCI, "oci:"))
KNOWN = "oci:DIR[:TAG], docker://REF, containers-storage:[DRIVER@ROOT+RUNROOT]NAME[:TAG], " \
        "oci-archive:PATH[:TAG], docker-archive:PATH[:NAME:TAG]"
_STORE_SPEC = re.compile(r"\[(?:(?P<driver>[a-z0-9_]+)@)?(?P<root>[^+\]:]*)(?:\+(?P<runroot>[^\]:]*))?(?::[^\]]*)?\]")


@dataclass(frozen=True)
class ImageRef:
    transport: str  # OCI, DOCKER, STORAGE, OCI_ARCHIVE, DOCKER_ARCHIVE
    text: str  # the whole reference, as skopeo takes it
    path: str | None = None  # an OCI layout or an archive ("-": standard output)
    tag: str | None = None  # an oci:/oci-archive: tag; a registry's or storage name's; docker-archive's NAME:TAG
    store_root: str | None = None  # containers-storage: the graph root named in the reference

    def __str__(self) -> str:
        return self.text

    @property
    def is_layout(self) -> bool:
        return self.transport == OCI

    @property
    def is_stdout(self) -> bool:
        return self.transport == OCI_ARCHIVE and self.path == "-"


def parse_image_ref(text: str, what: str = "image") -> ImageRef:
    """One reference of any known transport; anything else is a one-line error."""
    transport = next((name for name, prefix in PREFIXES if text.startswith(prefix)), None)
    if transport is None:
        raise PkglayerError(f"{what} {text!r}: unknown transport; expected one of {KNOWN}")
    if transport == OCI:
        directory, tag = parse_layout_ref(text)
        return ImageRef(OCI, text, directory, tag)
    if transport == DOCKER:
        return ImageRef(DOCKER, text, tag=parse_docker_ref(text).tag)
    rest = text.split(":", 1)[1]
    if transport == STORAGE:
        root = None
        name = rest
        if rest.startswith("["):
            m = _STORE_SPEC.match(rest)
            if m is None:
                raise PkglayerError(f"{what} {text!r}: the store is [DRIVER@ROOT+RUNROOT:OPTIONS]")
            root, name = m["root"] or None, rest[m.end():]
        if not name:
            raise PkglayerError(f"{what} {text!r}: no image name after containers-storage:")
        last = name.rsplit("/", 1)[-1]
        tag = last.split(":", 1)[1] if ":" in last and "@" not in last else None
        return ImageRef(STORAGE, text, tag=tag, store_root=root)
    path, _, tag = rest.partition(":")
    if not path:
        raise PkglayerError(f"{what} {text!r}: no archive path")
    if transport == OCI_ARCHIVE and tag and not REF_RE.fullmatch(tag):
        raise PkglayerError(f"{what} {text!r}: tag {tag!r} is not a valid OCI ref name")
    return ImageRef(transport, text, path, tag or None)


def check_readable(ref: ImageRef, what: str) -> None:
    """What must exist before an image can be read from `ref`."""
    if ref.is_stdout:
        raise PkglayerError(f"{what} {ref}: standard output can only be written")
    if ref.transport in (OCI_ARCHIVE, DOCKER_ARCHIVE) and not os.path.isfile(ref.path or ""):
        raise PkglayerError(f"{what} {ref}: {ref.path} does not exist or is not a file")
    if ref.transport == STORAGE and ref.store_root and not os.path.isdir(ref.store_root):
        raise PkglayerError(f"{what} {ref}: the store {ref.store_root} does not exist")


def fetch(ref: ImageRef, work: Workspace, name: str, opts=None, decompress: bool = False,
          what: str = "image") -> tuple[str, str | None]:
    """A local OCI layout holding the image: an oci: layout as it is, anything else copied
    into the workspace by skopeo (blobs verified on the way). `decompress` keeps layers
    uncompressed where the source stores them so (containers-storage): no compression
    that the reader would undo at once."""
    check_readable(ref, what)
    if ref.is_layout:
        assert ref.path is not None
        return ref.path, ref.tag
    layout = work.path(name)
    args = ["copy", "--quiet", *(opts or RegistryOptions()).skopeo_args("src")]
    log.info("copying %s into a local layout", ref)
    if decompress:
        # Straight to oci: with uncompressed layers, skopeo 1.9 keeps +gzip media types on
        # plain tars (containers/image#1270); through dir: they come out right.
        plain = work.path(f"{name}-dir")
        skopeo([*args, ref.text, f"dir:{plain}"], f"reading {ref}")
        skopeo(["copy", "--quiet", "--dest-oci-accept-uncompressed-layers", f"dir:{plain}", f"oci:{layout}:{name}"],
               f"reading {ref}")
        return layout, name
    skopeo([*args, ref.text, f"oci:{layout}:{name}"], f"reading {ref}")
    return layout, name


def inspect(ref: ImageRef, work: Workspace, opts=None, limits: Limits = DEFAULT_LIMITS,
            what: str = "image") -> Image:
    """The manifest and config of an image, without its layers where the transport
    allows (registries, containers-storage); checked like any image."""
    check_readable(ref, what)
    if ref.is_layout:
        assert ref.path is not None
        return open_layout(ref.path, ref.tag, limits)
    opts = opts or RegistryOptions()
    if ref.transport == DOCKER:
        return fetch_image(ref.text, opts, limits)[1]
    if ref.transport == STORAGE:
        raw = skopeo(["inspect", "--raw", *opts.skopeo_args(""), ref.text], f"reading {ref}",
                     limit=limits.manifest_bytes)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()

        def read_config(desc) -> bytes:
            data = skopeo(["inspect", "--raw", "--config", *opts.skopeo_args(""), ref.text],
                          f"reading the config of {ref}", limit=limits.config_bytes)
            return check_bytes(data, desc, "config")

        return image_from_manifest("", digest, raw, read_config, limits, ref.text)
    layout, tag = fetch(ref, work, "inspected", opts, what=what)
    return open_layout(layout, tag, limits)


def exists(ref: ImageRef, opts=None) -> bool:
    """Whether the image is there to be read (an earlier build of an output)."""
    if ref.is_stdout:
        return False
    if ref.transport in (OCI_ARCHIVE, DOCKER_ARCHIVE):
        return os.path.isfile(ref.path or "")
    if ref.transport == STORAGE:
        try:
            skopeo(["inspect", "--raw", *(opts or RegistryOptions()).skopeo_args(""), ref.text], f"reading {ref}",
                   limit=DEFAULT_LIMITS.manifest_bytes)
        except RegistryError:
            return False
        return True
    return ref.is_layout and os.path.exists(os.path.join(ref.path or "", "index.json"))


def publish(layout: str, tag: str, dest: ImageRef, opts=None, limits: Limits = DEFAULT_LIMITS,
            source_date_epoch: int = 0):
    """Copy the image oci:LAYOUT:TAG to `dest`. A registry push returns its report (what
    was uploaded); other transports return None."""
    opts = opts or RegistryOptions()
    if dest.transport == DOCKER:
        image = open_layout(layout, tag, limits)
        blobs = BlobDir(layout)
        local = {d for d in [image.config_digest, *(x.digest for x in image.layers)] if blobs.has(d)}
        return push(layout, tag, image, dest.text, opts, local=local)
    if dest.transport == OCI_ARCHIVE:
        write_oci_archive(layout, tag, dest, source_date_epoch)
        return None
    if dest.transport == DOCKER_ARCHIVE:
        assert dest.path is not None
        name = f":{dest.tag}" if dest.tag else ""
        _replace_file_with(dest.path, lambda tmp: skopeo(
            ["copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{tmp}{name}"], f"writing {dest}"))
        return None
    if dest.transport == STORAGE:
        # The store keeps the manifest as written: the image keeps pkglayer's digests.
        skopeo(["copy", "--quiet", "--preserve-digests", f"oci:{layout}:{tag}", dest.text], f"writing {dest}")
        return None
    raise PkglayerError(f"{dest}: cannot publish to an oci: layout this way")


def _replace_file_with(path: str, write) -> None:
    """Write a file through `write(tmp)` next to `path`, then rename it into place:
    readers never see half an archive, and a failure leaves the old one."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.pkglayer-tmp")
    unlink_quiet(tmp)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        unlink_quiet(tmp)
        raise


def write_oci_archive(layout: str, tag: str, dest: ImageRef, source_date_epoch: int = 0) -> None:
    """A tar of the image's layout (oci-layout, index.json naming the image, its blobs),
    names sorted, owner root, times `source_date_epoch`: the same image gives the same
    archive. "-" writes it to standard output."""
    import tarfile  # here: only archives need it, and every start would pay

    image = open_layout(layout, tag)
    name = dest.tag or tag
    blobs = BlobDir(layout)
    manifest = blobs.read(image.manifest_digest, os.path.getsize(blobs.path(image.manifest_digest)),
                          DEFAULT_LIMITS.manifest_bytes, "manifest")
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": image.manifest_digest, "size": len(manifest),
        "annotations": {REF_NAME: name}}]}
    digests = sorted({image.manifest_digest, image.config_digest, *(d.digest for d in image.layers)})

    def entries(tar: tarfile.TarFile) -> None:
        def info(member: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
            ti = tarfile.TarInfo(member)
            ti.type, ti.size, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = kind, size, source_date_epoch, 0, 0, "", ""
            ti.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            return ti

        for d in ("blobs", "blobs/sha256"):
            tar.addfile(info(d, 0, tarfile.DIRTYPE))
        for digest in digests:
            path = blobs.path(digest)
            with open(path, "rb") as f:
                tar.addfile(info(f"blobs/sha256/{digest[7:]}", os.fstat(f.fileno()).st_size), f)
        for member, data in (("index.json", canonical_json(index)), ("oci-layout", canonical_json(OCI_LAYOUT))):
            tar.addfile(info(member, len(data)), io.BytesIO(data))

    if dest.is_stdout:
        if sys.stdout.isatty():
            raise PkglayerError("--output oci-archive:-: standard output is a terminal; pipe it (| podman load)")
        sys.stdout.flush()
        with os.fdopen(os.dup(sys.stdout.fileno()), "wb") as out, \
                tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            entries(tar)
        return
    assert dest.path is not None

    def write(tmp: str) -> None:
        with open(tmp, "wb") as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            entries(tar)

    _replace_file_with(dest.path, write)
