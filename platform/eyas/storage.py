"""One way to read and write artifacts by URI: local paths, ``s3://`` and ``gs://``.

An artifact is a directory of shards plus ``manifest.json``, written LAST: a directory
without a manifest is unfinished and readers refuse it. ``s3://`` uses ``AWS_ENDPOINT_URL``
(path-style addressing, for S3-compatible servers), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY`` and ``AWS_REGION``/``AWS_DEFAULT_REGION``; ``gs://`` uses pyarrow's
GCS filesystem with the usual Google credentials.

One writer at a time: a stage locks ``<output>.lock`` before it clears or writes its artifact
and releases it when the manifest is written (``acquire_lock``); a second writer of the same
URI is refused with an error naming the holder.

Relative local paths are relative to the eyas home: ``$EYAS_HOME`` when set (an absolute
directory, normally the checkout a job was submitted from), else the current directory. Under
``ray job submit --working-dir`` the current directory is Ray's temporary copy of the working
dir (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), which disappears with the Ray
session or the next edit: a job refuses a relative ``run.output`` there unless ``EYAS_HOME`` is
set (``check_output``).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

MANIFEST = "manifest.json"
HOME_ENV = "EYAS_HOME"
RAY_PACKAGE_PREFIX = "_ray_pkg_"  # Ray's unpacked working_dir / py_modules packages


COPY_CHUNK = 8 << 20  # bytes per streamed chunk in ``copy``
LOCK_SUFFIX = ".lock"


class ArtifactError(RuntimeError):
    """An artifact is missing, unfinished, or was produced by a different config."""


class ArtifactLockedError(ArtifactError):
    """Another run is writing the same artifact."""


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    }
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def ray_package_dir(cwd: str | None = None) -> str | None:
    """The Ray working_dir package folder ``cwd`` (default: the current directory) lies in, or
    None: under ``ray job submit --working-dir`` a job runs in such a temporary copy."""
    path = os.path.abspath(cwd or os.getcwd())
    parts = path.split(os.sep)
    for i, part in enumerate(parts):
        if part.startswith(RAY_PACKAGE_PREFIX):
            return os.sep.join(parts[: i + 1])
    return None


def local_root() -> str:
    """The directory relative local paths are resolved against: ``$EYAS_HOME``, else the cwd."""
    home = os.environ.get(HOME_ENV)
    if not home:
        return os.getcwd()
    path = os.path.expanduser(home)
    if not os.path.isabs(path):
        raise ArtifactError(f"{HOME_ENV}={home!r} must be an absolute path (the checkout the job was submitted from)")
    if not os.path.isdir(path):
        raise ArtifactError(f"{HOME_ENV}={home!r} is not a directory on this node: pass the checkout's absolute "
                            "path on a local cluster, or use s3:// / gs:// outputs on a remote one")
    return path


def is_relative_local(uri: str) -> bool:
    """A local path that is neither absolute nor ``~``-rooted (it depends on the eyas home)."""
    scheme = urlparse(uri).scheme
    if scheme not in ("", "file"):
        return False
    path = uri[len("file://"):] if scheme == "file" else uri
    return not os.path.isabs(os.path.expanduser(path))


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (as ``resolve`` would); remote URIs unchanged."""
    return uri if is_remote(uri) else resolve(uri)[1]


def check_output(uri: str, key: str = "run.output") -> str:
    """Refuse a relative local output inside Ray's temporary working_dir copy without
    ``EYAS_HOME`` (it would vanish with the package); return the output's absolute URI."""
    package = ray_package_dir()
    if is_relative_local(uri) and package and not os.environ.get(HOME_ENV):
        raise ArtifactError(
            f"{key}={uri!r} is relative and this job runs in Ray's temporary copy of its working_dir "
            f"({package}), deleted with the Ray session: submit with --runtime-env-json "
            f"'{{\"env_vars\": {{\"{HOME_ENV}\": \"/abs/path/of/checkout\"}}}}' (README: Running jobs) "
            f"or set {key} to an absolute path or an s3:// / gs:// URI")
    return absolute_uri(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI to ``(filesystem, path inside it)``. Local paths become absolute, relative
    ones against ``local_root()`` (``$EYAS_HOME`` or the current directory)."""
    scheme = urlparse(uri).scheme
    if scheme == "s3":
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if scheme in ("gs", "gcs"):
        return pafs.GcsFileSystem(), uri.split("://", 1)[1].rstrip("/")
    if scheme in ("", "file"):
        path = uri[len("file://"):] if scheme == "file" else uri
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            path = os.path.join(local_root(), path)
        return pafs.LocalFileSystem(), os.path.normpath(path)
    raise ArtifactError(f"unsupported storage URI {uri!r}: use a local path, s3:// or gs://")


def join(uri: str, *parts: str) -> str:
    """Join URI path parts with '/'."""
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def is_remote(uri: str) -> bool:
    return urlparse(uri).scheme in ("s3", "gs", "gcs")


def write_bytes(uri: str, data: bytes) -> None:
    """Write one object. Local writes go through a temp file + rename, so readers never see a partial file."""
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as out:  # a single PUT is atomic on object stores
        out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as inp:
            return inp.read()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{uri} does not exist") from exc


def copy(src: str, dst: str) -> None:
    """Copy a file or a whole directory tree between URIs (local, s3://, gs://), streamed in
    chunks: nothing is held in memory whole (checkpoints and drafts are GBs on real targets)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    kind = src_fs.get_file_info(src_path).type
    if kind == pafs.FileType.NotFound:
        raise ArtifactError(f"{src} does not exist")
    if kind == pafs.FileType.File:
        dst_fs.create_dir(dst_path.rsplit("/", 1)[0], recursive=True)
    else:  # the local filesystem does not create the tree's folders by itself
        for info in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
            if info.type == pafs.FileType.File:
                rel = info.path[len(src_path.rstrip("/")):].lstrip("/")
                dst_fs.create_dir(join(dst_path, rel).rsplit("/", 1)[0], recursive=True)
    pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs,
                    chunk_size=COPY_CHUNK, use_threads=True)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=False, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffix: str = "") -> list[str]:
    """All files below ``uri`` (recursively) whose name ends with ``suffix``, as URIs, sorted."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    scheme = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(scheme + f.path for f in found if f.type == pafs.FileType.File and f.path.endswith(suffix))


def expand(uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """A file, a directory (its files with one of ``suffixes``, recursively) or a glob
    (``*``/``?``/``[]`` in the last parts) -> sorted URIs. Nothing found is an error naming the URI."""
    if not any(ch in uri for ch in "*?["):
        found = list_files(uri) if exists(uri) else []
        found = found if found == [uri] else [f for f in found if f.endswith(suffixes)]
    else:
        base = uri[: min(uri.index(ch) for ch in "*?[" if ch in uri)].rsplit("/", 1)[0]
        found = [f for f in list_files(base) if fnmatch.fnmatchcase(f, uri)]
    if not found:
        raise ArtifactError(f"{uri}: no such file, or no {'/'.join(suffixes)} files there. Check the path.")
    return found


def delete_dir(uri: str) -> None:
    """Remove an artifact directory and everything in it (no error when absent)."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def versions() -> dict[str, str]:
    """Versions of the main components, recorded in every manifest."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("eyas", "ray", "torch", "transformers", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    return out


# ----------------------------------------------------------------------------- writer lock

# Locks this process holds: lock URI -> the descriptor holding its flock (local) or the token
# its lock object carries (object stores).
_HELD: dict[str, int | str] = {}


def lock_uri(uri: str) -> str:
    """The writer lock of the artifact at ``uri``: ``<output>.lock``, beside the artifact (a run
    clears the artifact's directory, so the lock cannot live inside it)."""
    return absolute_uri(uri).rstrip("/") + LOCK_SUFFIX


def acquire_lock(uri: str) -> None:
    """Make this process the only writer of the artifact at ``uri`` until ``release_lock``;
    re-entrant within one process. Raises ArtifactLockedError naming the holder.

    Local paths: ``<output>.lock`` is held with an exclusive ``flock`` and records the holder
    (pid, host, time). The kernel drops the flock when the holder exits, so the lock file of a
    run that died is taken over at once, with no race between two takers. On NFS this needs
    working file locks (Linux maps flock onto NFS byte-range locks).

    ``s3://`` / ``gs://``: pyarrow has no conditional (if-none-match) put, so the lock object
    is written only where none exists and read back; two writers starting within one
    round trip of each other can both pass. A lock object whose holder is a dead process on
    this host is taken over; one left by a run that died elsewhere must be deleted by hand
    (the error names it): a live holder cannot be told from a dead one from another host.
    """
    lock = lock_uri(uri)
    if lock not in _HELD:
        _HELD[lock] = _lock_object(lock, uri) if is_remote(lock) else _lock_file(resolve(lock)[1], uri)


def release_lock(uri: str) -> None:
    """Drop the lock ``acquire_lock`` took for ``uri`` in this process (no-op when none)."""
    lock = lock_uri(uri)
    if lock not in _HELD:
        return
    held = _HELD.pop(lock)
    fs, path = resolve(lock)
    if isinstance(held, int):
        with contextlib.suppress(FileNotFoundError):  # deleted by hand meanwhile
            os.unlink(path)  # before unlocking: a waiter that opened the file sees it is gone
        os.close(held)
    elif exists(lock) and json.loads(read_bytes(lock)).get("token") == held:
        fs.delete_file(path)


def _holder() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": platform.node(), "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _lock_file(path: str, uri: str) -> int:
    """flock ``path`` (created if absent) and write this process in it; the open descriptor."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0)
            os.close(fd)
            raise ArtifactLockedError(_locked(uri, path, holder, "wait for it to finish or stop "
                                              "it, or choose another run.output")) from None
        if _same_file(fd, path):  # not unlinked by a holder releasing it just now
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder()).encode())
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _lock_object(lock: str, uri: str) -> str:
    """Write the lock object where none is held (see ``acquire_lock``), read it back; the token."""
    hint = f"wait for it to finish, or delete {lock} if that run is gone"
    found = read_bytes(lock) if exists(lock) else None
    if found is not None and not _dead_here(found):
        raise ArtifactLockedError(_locked(uri, lock, found, hint))
    me = _holder()
    write_json(lock, me)
    found = read_bytes(lock)
    if json.loads(found).get("token") != me["token"]:
        raise ArtifactLockedError(_locked(uri, lock, found, hint))
    return me["token"]


def _dead_here(record: bytes) -> bool:
    """Whether a lock record names a process of this host that no longer runs."""
    try:
        holder = json.loads(record)
        pid = int(holder["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    if holder.get("host") != platform.node():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return pid == os.getpid()  # this process's own lock from an attempt that did not finish


def _locked(uri: str, lock: str, record: bytes, hint: str) -> str:
    """One line: which artifact, who holds it, what to do."""
    try:
        h = json.loads(record)
        who = f"pid {h['pid']} on {h['host']} since {h['since']}"
    except (ValueError, KeyError, TypeError):
        who = "a writer that is starting"
    return f"{uri} is being written by another run ({who}; lock {lock}): {hint}"


@dataclass
class Artifact:
    """A stage's output directory, identified by URI."""

    uri: str

    def path(self, *parts: str) -> str:
        return join(self.uri, *parts)

    @property
    def manifest_uri(self) -> str:
        return self.path(MANIFEST)

    def is_complete(self) -> bool:
        return exists(self.manifest_uri)

    def manifest(self) -> dict[str, Any]:
        """The manifest; an artifact without one is unfinished and refused."""
        if not self.is_complete():
            raise ArtifactError(
                f"{self.uri} has no {MANIFEST}: the stage that writes it has not finished. "
                f"Run that stage (or point the config at a finished artifact)."
            )
        return read_json(self.manifest_uri)

    def write_manifest(self, stage: str, config: dict[str, Any], config_hash: str, **fields: Any) -> dict[str, Any]:
        """Write ``manifest.json`` last, marking the artifact complete."""
        manifest = {"stage": stage, "config_hash": config_hash, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "versions": versions(), **fields, "config": config}
        write_json(self.manifest_uri, manifest)
        release_lock(self.uri)
        return manifest

    def lock(self) -> None:
        """Become the artifact's only writer until ``write_manifest`` (``acquire_lock``)."""
        acquire_lock(self.uri)

    def prepare(self, config_hash: str, force: bool) -> bool:
        """Decide whether the stage must run. Returns False when a finished artifact with the same
        config exists (a no-op rerun). Locks the artifact (refused while another run writes it)
        and clears partial or forced outputs before a run."""
        if self.is_complete() and not force:
            found = self.manifest().get("config_hash")
            if found == config_hash:
                return False
            raise ArtifactError(
                f"{self.uri} already holds a finished artifact from another config (hash {found}, "
                f"now {config_hash}). Pass force=true to overwrite it, or choose another output URI."
            )
        self.lock()
        delete_dir(self.uri)
        return True
