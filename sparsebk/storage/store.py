"""One storage layer for everything a run, a sweep or a prepared dataset writes and reads.

    store = open_store("s3://bucket/runs?endpoint_override=127.0.0.1:8333&scheme=http")
    run = store.join("tiny")
    run.write_text("summary.json", "{}")        # atomic: readers see all of it or nothing
    run.read_text("summary.json"); run.exists("x"); run.list("plots"); run.delete("plots")
    fs, path = run.ray_location()               # RunConfig(storage_path=path, storage_filesystem=fs)

A location is a local path or a URI that `pyarrow.fs.FileSystem.from_uri` opens (s3://,
gs://, hdfs://, with its query options: endpoint_override, scheme, region, ...): the same
file-system layer Ray Train writes its checkpoints with, so a run's side files sit next to
its checkpoints wherever they are. Credentials are never part of a location: pyarrow takes
them from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_
CREDENTIALS) or the node's instance role.

Relative local paths resolve against `home()` ($SPARSEBK_HOME, default ~/sparsebk), never
against the process's working directory: under `ray job submit --working-dir .` that is a
temporary copy Ray may delete.

Object stores cannot append, so line logs (metrics, schedule records) written through
`line_log` append to a file on a local path and, on an object store, put one part object per
flush under `<name>.parts/`; `read_lines` returns both in the order they were written.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

HOME_ENV = "SPARSEBK_HOME"
SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")
_FS_CACHE: dict[str, tuple] = {}


def home() -> Path:
    """Where relative run and data paths live: $SPARSEBK_HOME, else ~/sparsebk."""
    value = os.environ.get(HOME_ENV)
    return Path(os.path.expanduser(value or "~/sparsebk")).resolve()


def is_uri(location: str) -> bool:
    return "://" in str(location)


# query options pyarrow would take as credentials: refused in a location, like user:secret@
SECRET_OPTIONS = ("access_key", "secret_key", "session_token", "access_key_id",
                  "secret_access_key", "credentials", "token", "password")


def redact(location: str) -> str:
    """`location` with any user:secret@ and secret query values replaced by '***' (for
    messages and logs)."""
    location = str(location)
    if not is_uri(location):
        return location
    s = urlsplit(location)
    netloc = s.netloc.rsplit("@", 1)[1] if "@" in s.netloc else s.netloc
    netloc = ("***@" + netloc) if "@" in s.netloc else netloc
    query = "&".join(f"{k}=***" if k.lower() in SECRET_OPTIONS else f"{k}={v}"
                     for k, _, v in (q.partition("=") for q in s.query.split("&") if q))
    return urlunsplit((s.scheme, netloc, s.path, query, s.fragment))


def check_no_credentials(location: str, field: str = "path") -> None:
    """Refuse a URI that carries credentials (user:secret@host, ?secret_key=...): they would
    be echoed in messages, logged, and stored in checkpoints' configs and exports. The
    message shows the URI redacted."""
    if not is_uri(location):
        return
    s = urlsplit(str(location))
    keys = {k.lower() for k, _, _ in (q.partition("=") for q in s.query.split("&") if q)}
    if "@" in s.netloc or keys & set(SECRET_OPTIONS):
        raise ValueError(
            f"{field}: {redact(location)} carries credentials; give them through the "
            f"environment instead (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            f"GOOGLE_APPLICATION_CREDENTIALS) or the node's role, never in a URI")


def resolve_location(location: str | os.PathLike, field: str = "path") -> str:
    """A URI unchanged (its scheme checked, credentials refused); a local path made absolute:
    `~` expanded, a relative one under `home()`. Raises ValueError naming `field` for an
    unknown scheme or a URI with credentials in it."""
    location = str(location)
    if is_uri(location):
        check_no_credentials(location, field)
        scheme = urlsplit(location).scheme
        if scheme not in SCHEMES:
            raise ValueError(f"{field}: URI scheme {scheme!r} of {redact(location)!r} is not one pyarrow "
                             f"opens; use one of {', '.join(SCHEMES)} or a local path")
        if scheme == "file":
            return str(Path(urlsplit(location).path).resolve())
        return location.rstrip("/") if not urlsplit(location).query else location
    p = Path(os.path.expanduser(location))
    return str(p if p.is_absolute() else (home() / p).resolve())


def join_location(location: str, *parts: str) -> str:
    """`location` (a resolved path or URI) / parts, keeping a URI's query options; no
    filesystem is opened (so no network call)."""
    rel = _check_rel("/".join(str(p) for p in parts))
    if not rel:
        return location
    if not is_uri(location):
        return str(Path(location) / rel)
    s = urlsplit(location)
    return urlunsplit((s.scheme, s.netloc, s.path.rstrip("/") + "/" + rel, s.query, ""))


def _check_rel(rel: str) -> str:
    rel = str(rel).strip("/")
    if rel and any(part in ("", ".", "..") for part in rel.split("/")):
        raise ValueError(f"{rel!r}: a store path is relative, without '.', '..' or '//'")
    return rel


def _filesystem(root: str):
    """(pyarrow FileSystem, its path of `root`), cached per root for this process."""
    if root not in _FS_CACHE:
        import pyarrow.fs as pafs

        if is_uri(root):
            _FS_CACHE[root] = pafs.FileSystem.from_uri(root)
        else:
            _FS_CACHE[root] = (pafs.LocalFileSystem(), root)
    return _FS_CACHE[root]


class Store:
    """A folder on a local path or an object store; every name below it is relative ('a/b')."""

    def __init__(self, location: str | os.PathLike, *, _fs=None, _path: str | None = None):
        location = str(location)
        # a config's relative path was resolved under home() already; here one given on a
        # command line means what it means to any file tool: relative to the cwd
        self.uri = (resolve_location(location) if is_uri(location)
                    else str(Path(os.path.expanduser(location)).resolve()))
        if _fs is None:
            _fs, _path = _filesystem(self.uri)
        self.fs, self.root = _fs, _path.rstrip("/") or _path

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def join(self, *parts: str) -> "Store":
        """The store of a sub-folder (no '..': a name cannot escape its parent)."""
        rel = _check_rel("/".join(str(p) for p in parts))
        if not rel:
            return self
        return Store(join_location(self.uri, rel), _fs=self.fs,
                     _path=posixpath.join(self.root, rel))

    def path(self, rel: str = "") -> str:
        """The file system's own path of `rel` (what pyarrow / Ray calls take with self.fs)."""
        rel = _check_rel(rel)
        return posixpath.join(self.root, rel) if rel else self.root

    def location(self, rel: str = "") -> str:
        """What a person reads: the absolute path or the URI of `rel`."""
        return self.join(rel).uri if rel else self.uri

    def ray_location(self) -> tuple:
        """(filesystem or None, path) for RunConfig(storage_filesystem=, storage_path=)."""
        return (None, self.uri) if self.is_local else (self.fs, self.root)

    def relative(self, fs_path: str) -> str | None:
        """`fs_path` (a path of this store's file system) relative to this store, or None."""
        fs_path = str(fs_path).rstrip("/")
        if fs_path == self.root:
            return ""
        return fs_path[len(self.root) + 1:] if fs_path.startswith(self.root + "/") else None

    # --- files -------------------------------------------------------------------------
    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old object or all of the new one. Locally a temporary
        file beside the target is renamed over it; an object store's single put is atomic."""
        target = self.path(rel)
        if not self.is_local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        parent = posixpath.dirname(target)
        self.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def read_bytes(self, rel: str) -> bytes:
        """The whole object; FileNotFoundError (naming the location) when it is missing."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.location(rel)}: no such file") from None
        except OSError as e:
            if not self.exists(rel):
                raise FileNotFoundError(f"{self.location(rel)}: no such file") from None
            raise OSError(f"{self.location(rel)}: {e}") from e

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def list(self, rel: str = "", *, recursive: bool = False) -> list[str]:
        """Names under `rel` (relative to it, sorted); [] when it does not exist."""
        import pyarrow.fs as pafs

        base = self.path(rel)
        sel = pafs.FileSelector(base, allow_not_found=True, recursive=recursive)
        names = [info.path[len(base.rstrip("/")) + 1:] for info in self.fs.get_file_info(sel)]
        return sorted(n for n in names if n)

    def delete(self, rel: str = "") -> None:
        """A file or a folder with everything in it; nothing when it does not exist."""
        import pyarrow.fs as pafs

        target = self.path(rel)
        kind = self.fs.get_file_info(target).type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(target)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(target)

    def upload(self, local_dir: str | os.PathLike, rel: str = "", *, last: str | None = None) -> None:
        """Copy a local folder's files under `rel`, the file named `last` after all others
        (a manifest: its presence says the rest is complete)."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == last)
        for p in files:
            name = p.relative_to(local_dir).as_posix()
            self.write_bytes(posixpath.join(_check_rel(rel), name) if rel else name, p.read_bytes())

    # --- line logs ---------------------------------------------------------------------
    def line_log(self, rel: str, *, flush_s: float = 30.0) -> "LineLog":
        return LineLog(self, rel, flush_s=flush_s)

    def read_lines(self, rel: str) -> list[str]:
        """The lines of a `line_log`: the local file's, then its parts' in write order."""
        lines = self.read_text(rel).splitlines() if self.is_file(rel) else []
        parts = _check_rel(rel) + ".parts"
        for name in self.list(parts):
            lines.extend(self.read_text(f"{parts}/{name}").splitlines())
        return lines


class LineLog:
    """A file-like appender (write/flush/close) of text lines.

    Local: appends to the file, line-buffered (a crash loses no line). Object store: buffers
    and puts the lines since the last put as one part object, named by time so a later
    attempt's parts sort after an earlier one's. It puts at most every `flush_s` seconds
    (a `flush()` or `write` sooner keeps buffering: a training loop may flush every log
    interval), and always on `flush(force=True)` and `close()`."""

    def __init__(self, store: Store, rel: str, *, flush_s: float = 30.0):
        self.store, self.rel, self.flush_s = store, _check_rel(rel), flush_s
        self._buf: list[str] = []
        self._last = time.monotonic()
        self._f = None
        if store.is_local:
            path = Path(store.path(self.rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        if self._f is not None:
            self._f.write(text)
        else:
            self._buf.append(text)
            self.flush()

    def flush(self, force: bool = False) -> None:
        if self._f is not None:
            self._f.flush()
            return
        if not self._buf or (not force and time.monotonic() - self._last < self.flush_s):
            return
        name = f"{self.rel}.parts/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        self.store.write_text(name, "".join(self._buf))
        self._buf, self._last = [], time.monotonic()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        else:
            self.flush(force=True)


def open_store(location: str | os.PathLike) -> Store:
    """A Store for a local path (relative: to the cwd; configs resolve theirs under home()
    with `resolve_location` first) or a URI."""
    return Store(location)
