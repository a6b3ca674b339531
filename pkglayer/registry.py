"""Registries (the OCI distribution API) through skopeo, with the user's containers auth.

skopeo does the transfers: `pull` copies `docker://REF` into a local OCI layout, `push`
copies a layout to `docker://REF` (`--preserve-digests`, so the manifest digest in the
registry is the build's), `fetch_image` reads a remote manifest and config without any
layer. skopeo verifies every digest it copies, reads `auth.json`/`--authfile` and
`registries.conf`, and skips blobs the destination already has.

skopeo does not say which blobs it skipped, so before a push `blob_presence` asks the
registry with a HEAD request per blob (`/v2/<name>/blobs/<digest>`), authenticating
with the same auth file skopeo uses (anonymous, Basic, or Bearer tokens; credential
helpers are not supported, in which case the figures are reported as unknown and the
push still goes through skopeo).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import PkglayerError
from .layout import (
    DEFAULT_LIMITS,
    Descriptor,
    Image,
    ImageError,
    Limits,
    check_bytes,
    image_from_manifest,
    parse_json,
    pick_from_index,
)
from .mediatypes import INDEX_TYPES

DOCKER_PREFIX = "docker://"
_HEAD_TIMEOUT = 30
_SKOPEO_TIMEOUT = 6 * 3600


class RegistryError(PkglayerError):
    """skopeo or the registry failed."""


@dataclass(frozen=True)
class RegistryOptions:
    authfile: str | None = None
    tls_verify: bool | None = None  # None: skopeo's default (verify)

    def skopeo_args(self, role: str) -> list[str]:
        """Flags for `skopeo copy` (role "src" or "dest") or `skopeo inspect` (role "")."""
        args = []
        if self.authfile:
            args += [f"--{role}-authfile" if role else "--authfile", self.authfile]
        if self.tls_verify is not None:
            flag = f"--{role}-tls-verify" if role else "--tls-verify"
            args.append(f"{flag}={'true' if self.tls_verify else 'false'}")
        return args


@dataclass(frozen=True)
class DockerRef:
    registry: str  # host[:port] as the user wrote it ("docker.io" for Docker Hub)
    repository: str  # "library/debian", "pkglayer/app"
    tag: str | None
    digest: str | None

    @property
    def transport(self) -> str:
        ref = f"{DOCKER_PREFIX}{self.registry}/{self.repository}"
        if self.tag:
            ref += f":{self.tag}"
        if self.digest:
            ref += f"@{self.digest}"
        return ref

    def with_digest(self, digest: str) -> DockerRef:
        return DockerRef(self.registry, self.repository, None, digest)

    @property
    def api_host(self) -> str:
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    def same_repository(self, other: DockerRef) -> bool:
        return (self.api_host, self.repository) == (other.api_host, other.repository)


_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_docker_ref(ref: str | None) -> bool:
    return bool(ref) and ref.startswith(DOCKER_PREFIX)


def parse_docker_ref(ref: str) -> DockerRef:
    """docker://[HOST[:PORT]/]NAME[:TAG][@sha256:...], with Docker Hub's defaults."""
    if not ref.startswith(DOCKER_PREFIX):
        raise PkglayerError(f"{ref!r} is not a docker://REF reference")
    rest = ref[len(DOCKER_PREFIX):]
    name, _, digest = rest.partition("@")
    if digest and not _DIGEST.fullmatch(digest):
        raise PkglayerError(f"{ref!r}: digest must be sha256:<64 hex>")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise PkglayerError(f"{ref!r}: invalid tag {tag!r}")
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry, path = parts[0], parts[1:]
    else:
        registry, path = "docker.io", parts
        if len(path) == 1:
            path = ["library", *path]
    if not path or not all(_COMPONENT.fullmatch(p) for p in path):
        raise PkglayerError(f"{ref!r}: invalid repository name {'/'.join(path)!r} (lower case, digits, . _ -)")
    if not tag and not digest:
        tag = "latest"
    return DockerRef(registry, "/".join(path), tag, digest or None)


# ---------------------------------------------------------------- skopeo


def skopeo(args: list[str], what: str, limit: int | None = None, timeout: float = _SKOPEO_TIMEOUT) -> bytes:
    import subprocess  # here: a local build runs no skopeo and need not load it
    import tempfile

    argv = ["skopeo", *args]
    try:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            out = proc.stdout.read(limit + 1) if limit is not None else proc.stdout.read()
            too_big = limit is not None and len(out) > limit
            if too_big:
                proc.kill()
            proc.stdout.close()
            rc = proc.wait(timeout=timeout)
            if too_big:
                raise RegistryError(f"{what}: more than the limit of {limit} bytes")
            if rc != 0:
                err.seek(0)
                lines = err.read()[-4000:].decode("utf-8", "replace").strip().splitlines()
                msg = lines[-1] if lines else f"exit status {rc}"
                msg = re.sub(r'^time="[^"]*" level=\w+ msg="(.*)"$', r"\1", msg)
                raise RegistryError(f"{what}: skopeo failed: {msg}")
    except FileNotFoundError:
        raise RegistryError("skopeo is not installed (apt-get install skopeo)") from None
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RegistryError(f"{what}: skopeo timed out") from None
    return out


def pull(ref: str, layout: str, tag: str, opts: RegistryOptions) -> None:
    """skopeo copy docker://REF oci:LAYOUT:TAG (for a multi-platform image, the host's)."""
    parse_docker_ref(ref)
    skopeo(["copy", "--quiet", *opts.skopeo_args("src"), ref, f"oci:{layout}:{tag}"], f"pulling {ref}")


def fetch_image(ref: str, opts: RegistryOptions, limits: Limits = DEFAULT_LIMITS) -> tuple[DockerRef, Image]:
    """The manifest and config of a remote image (no layers), checked against their digests.

    Returns the reference pinned to the manifest's digest, and the image (whose `layout`
    is empty: its blobs are not local)."""
    dref = parse_docker_ref(ref)
    raw = skopeo(["inspect", "--raw", *opts.skopeo_args(""), dref.transport], f"reading {ref}",
                  limit=max(limits.manifest_bytes, limits.index_bytes))
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    if dref.digest and digest != dref.digest:
        raise ImageError(f"{ref}: the registry sent a manifest with digest {digest}")
    obj = parse_json(raw, f"{ref}: manifest")
    if obj.get("mediaType") in INDEX_TYPES:
        desc = pick_from_index(obj, f"{ref}: index")
        pinned = dref.with_digest(desc.digest)
        raw = skopeo(["inspect", "--raw", *opts.skopeo_args(""), pinned.transport], f"reading {ref}",
                      limit=limits.manifest_bytes)
        check_bytes(raw, desc, "manifest")
        digest = desc.digest
    pinned = dref.with_digest(digest)

    def read_config(desc: Descriptor) -> bytes:
        if desc.size > limits.config_bytes:
            raise ImageError(f"{ref}: config is {desc.size} bytes, more than the limit of {limits.config_bytes}")
        data = skopeo(["inspect", "--raw", "--config", *opts.skopeo_args(""), pinned.transport],
                       f"reading the config of {ref}", limit=limits.config_bytes)
        return check_bytes(data, desc, "config")

    return pinned, image_from_manifest("", digest, raw, read_config, limits, ref)


# ---------------------------------------------------------------- HEAD checks


def _auth_files(authfile: str | None) -> list[str]:
    if authfile:
        return [authfile]
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return [os.environ["REGISTRY_AUTH_FILE"]]
    out = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append(os.path.join(runtime, "containers", "auth.json"))
    out.append(f"/run/containers/{os.getuid()}/auth.json")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    out.append(os.path.join(config, "containers", "auth.json"))
    out.append(os.path.join(os.path.expanduser("~"), ".docker", "config.json"))
    return out


def credentials(dref: DockerRef, authfile: str | None) -> tuple[str, str] | None:
    """(user, password) for the reference from the containers auth files, most specific
    key first (host/namespace/repo ... host), as containers-auth.json(5) describes."""
    keys = [f"{dref.registry}/{dref.repository}"]
    parts = dref.repository.split("/")
    keys += [f"{dref.registry}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]
    keys += [dref.registry, f"https://{dref.registry}", f"http://{dref.registry}"]
    if dref.registry == "docker.io":
        keys += ["https://index.docker.io/v1/", "index.docker.io"]
    for path in _auth_files(authfile):
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(1 << 20))
        except (OSError, ValueError):
            continue
        auths = data.get("auths") if isinstance(data, dict) else None
        if not isinstance(auths, dict):
            continue
        for key in keys:
            entry = auths.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    continue
                return user, password
        if authfile:
            break
    return None


class BlobChecker:
    """HEAD /v2/<name>/blobs/<digest> against one repository, with the containers auth."""

    def __init__(self, dref: DockerRef, opts: RegistryOptions):
        # ssl and urllib.request (http.client, email, socket) take ~30 ms to load: only a push needs them
        import ssl
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):  # a 3xx answer is the answer
                return None

        self.dref = dref
        self.opts = opts
        self.creds = credentials(dref, opts.authfile)
        self.auth_header: str | None = None
        self.base: str | None = None
        context = ssl.create_default_context()
        if opts.tls_verify is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        self.opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=context))

    def _request(self, method: str, url: str, headers: dict[str, str]):
        import urllib.error  # loaded by __init__ already (urllib.error: tempfile, shutil...)
        import urllib.request

        req = urllib.request.Request(url, method=method, headers=headers)
        try:
            return self.opener.open(req, timeout=_HEAD_TIMEOUT)
        except urllib.error.HTTPError as e:
            return e

    def _base(self) -> str:
        import urllib.error

        if self.base is None:
            schemes = ["https"] if self.opts.tls_verify is not False else ["https", "http"]
            last: Exception | None = None
            for scheme in schemes:
                try:
                    resp = self._request("GET", f"{scheme}://{self.dref.api_host}/v2/", {})
                    resp.close()
                    self.base = f"{scheme}://{self.dref.api_host}"
                    break
                except (urllib.error.URLError, OSError) as e:
                    last = e
            else:
                raise RegistryError(f"cannot reach {self.dref.api_host}: {last}")
        return self.base

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.creds is None:
                raise RegistryError(f"{self.dref.api_host} wants credentials and none are configured")
            token = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            self.auth_header = f"Basic {token}"
            return
        if scheme.lower() != "bearer":
            raise RegistryError(f"{self.dref.api_host}: unsupported auth scheme {scheme!r}")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{self.dref.api_host}: bearer challenge without a usable realm")
        query = {"scope": f"repository:{self.dref.repository}:pull"}
        if "service" in fields:
            query["service"] = fields["service"]
        headers = {}
        if self.creds is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
        resp = self._request("GET", realm + "?" + urllib.parse.urlencode(query), headers)
        with resp:
            if resp.status != 200:
                raise RegistryError(f"{self.dref.api_host}: token request failed with HTTP {resp.status}")
            body = json.loads(resp.read(1 << 20))
        token = body.get("token") or body.get("access_token")
        if not isinstance(token, str):
            raise RegistryError(f"{self.dref.api_host}: token response without a token")
        self.auth_header = f"Bearer {token}"

    def has(self, digest: str) -> bool:
        url = f"{self._base()}/v2/{self.dref.repository}/blobs/{digest}"
        for _ in range(2):
            headers = {"Authorization": self.auth_header} if self.auth_header else {}
            resp = self._request("HEAD", url, headers)
            resp.close()
            if resp.status == 401 and self.auth_header is None:
                self._authenticate(resp.headers.get("WWW-Authenticate", ""))
                continue
            if resp.status == 200 or 300 <= resp.status < 400:
                return True
            if resp.status == 404:
                return False
            raise RegistryError(f"HEAD {url}: HTTP {resp.status}")
        raise RegistryError(f"HEAD {url}: not authorised")


def blob_presence(ref: str, digests: Iterable[str], opts: RegistryOptions) -> dict[str, bool] | None:
    """Which of `digests` the repository of `ref` already has; None if that cannot be
    found out (unreachable, auth not usable without skopeo)."""
    checker = BlobChecker(parse_docker_ref(ref), opts)
    try:
        return {d: checker.has(d) for d in dict.fromkeys(digests)}
    except (RegistryError, urllib.error.URLError, OSError, ValueError):
        return None


# ---------------------------------------------------------------- push


@dataclass
class PushReport:
    destination: str
    manifest_digest: str
    blobs: int  # config and layers
    uploaded_blobs: int | None  # None: unknown (the registry could not be asked)
    uploaded_bytes: int | None
    skipped_blobs: int | None
    skipped_bytes: int | None

    def as_json(self) -> dict:
        return {
            "destination": self.destination,
            "manifestDigest": self.manifest_digest,
            "blobs": self.blobs,
            "uploadedBlobs": self.uploaded_blobs,
            "uploadedBytes": self.uploaded_bytes,
            "skippedBlobs": self.skipped_blobs,
            "skippedBytes": self.skipped_bytes,
        }


def push(layout: str, tag: str, image: Image, ref: str, opts: RegistryOptions,
         local: Iterable[str] | None = None) -> PushReport:
    """Copy oci:LAYOUT:TAG to docker://REF with skopeo, reporting what had to be uploaded.

    `local`, when given, is the set of blob digests present in the layout; a blob missing
    from it must already be in the destination repository (checked first)."""
    import tempfile  # here, as in skopeo()

    dref = parse_docker_ref(ref)
    if dref.digest:
        raise PkglayerError(f"{ref}: push to a tag, not to a digest")
    blobs = {image.config_digest: len(image.config_raw), **{d.digest: d.size for d in image.layers}}
    presence = blob_presence(ref, blobs, opts)
    if local is not None:
        missing = [d for d in blobs if d not in local]
        if missing and presence is None:
            raise RegistryError(
                f"cannot check that {ref} has the {len(missing)} layers reused from the prior image "
                "(the registry could not be asked); refusing to push an incomplete image")
        absent = [d for d in missing if presence is not None and not presence[d]]
        if absent:
            raise RegistryError(
                f"{ref} lacks {len(absent)} reused layer blobs (e.g. {absent[0]}) that are not in "
                "the local layout either; rebuild without --prior docker:// or push the prior image there first")
    with tempfile.TemporaryDirectory(prefix="pkglayer-push-") as tmp:
        digest_file = os.path.join(tmp, "digest")
        skopeo(["copy", "--quiet", "--preserve-digests", *opts.skopeo_args("dest"),
                 "--digestfile", digest_file, f"oci:{layout}:{tag}", dref.transport], f"pushing to {ref}")
        with open(digest_file) as f:
            pushed = f.read().strip()
    if pushed != image.manifest_digest:
        raise RegistryError(f"{ref}: the registry has manifest {pushed}, the layout {image.manifest_digest}")
    if presence is None:
        return PushReport(ref, pushed, len(blobs), None, None, None, None)
    skipped = [d for d, there in presence.items() if there]
    uploaded = [d for d, there in presence.items() if not there]
    return PushReport(
        destination=ref, manifest_digest=pushed, blobs=len(blobs),
        uploaded_blobs=len(uploaded), uploaded_bytes=sum(blobs[d] for d in uploaded),
        skipped_blobs=len(skipped), skipped_bytes=sum(blobs[d] for d in skipped),
    )

