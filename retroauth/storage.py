"""Object storage for documents, letters and submissions: local files (default) or S3.

Keys are built by ``key()`` from ids and fixed words only, never from patient data, and every key is
checked before use, so nothing a record contains can steer where a file goes.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class StorageError(Exception):
    """A storage operation failed; the message names the key, never the content."""


class IntegrityError(StorageError):
    """What was read back does not match the checksum it was written with."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


def key(*parts: object) -> str:
    """A storage key from ids and fixed words: ``key("documents", 12, "note.txt")``."""
    segments = [str(p) for p in parts]
    for seg in segments:
        if not _SEGMENT.match(seg) or ".." in seg:
            raise StorageError(f"invalid storage key segment {seg!r}: ids and fixed words only")
    return "/".join(segments)


def check_key(k: str) -> str:
    key(*k.split("/"))
    return k


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage(Protocol):
    """What every backend offers. ``put`` is idempotent: the same bytes under a key write once.

    ``put_concurrency``: how many puts a caller with many objects should make at once. Local files: 1 (a put
    waits on its own fsync, and threads would cost more CPU than they save); S3: several (each waits on the
    network)."""

    put_concurrency: int

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject: ...

    def get(self, key: str, sha256: str | None = None) -> bytes: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def list(self, prefix: str) -> list[str]: ...


class LocalStorage:
    """A directory; writes are atomic (temp file, fsync, rename) and private to the owner."""

    put_concurrency = 1

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._root = str(self.root)

    def _path(self, k: str) -> Path:
        return self.root / check_key(k)

    def _mkdirs(self, directory: str) -> None:
        """``directory`` and the missing folders above it, each 0700 (``os.makedirs`` would give the parents
        the umask's modes). Strings, not ``Path``: a put of a new letter makes two folders, and pathlib's
        parsing cost more CPU than the system calls."""
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            return
        except FileNotFoundError:
            if directory == self._root:  # the storage root itself is gone: nothing above it is ours to make
                raise
            self._mkdirs(os.path.dirname(directory))
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:  # another thread made it meanwhile
                pass

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        path = os.path.join(self._root, check_key(key))
        digest = sha256_hex(data)
        if os.path.isfile(path) and sha256_hex(Path(path).read_bytes()) == digest:
            return StoredObject(key, digest, len(data))
        # A temp name of this thread's own (kept out of ``list``), written, synced, then renamed over the key:
        # a reader sees the old object or the new one, never part of one.
        tmp = os.path.join(os.path.dirname(path), f".tmp-{os.path.basename(path)}-{os.getpid()}-{threading.get_ident()}")
        try:
            self._mkdirs(os.path.dirname(path))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # e.g. a file where a folder of the key should be
            raise StorageError(f"cannot write {key}: {exc.strerror}") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, digest, len(data))

    def get(self, key: str, sha256: str | None = None) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise StorageError(f"no object at {key}") from None
        if sha256 is not None and sha256_hex(data) != sha256:
            raise IntegrityError(f"checksum mismatch for {key}")
        return data

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / check_key(prefix) if prefix else self.root
        if not base.exists():
            return []
        return sorted(
            str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
        )


def open_storage(url: str, **s3_options: object) -> Storage:
    """``file://DIR`` (relative paths allowed: ``file://./var/storage``) or ``s3://bucket/prefix``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(parsed.netloc + parsed.path)
    if parsed.scheme == "s3":
        from retroauth.s3 import S3Storage

        return S3Storage(bucket=parsed.netloc, prefix=parsed.path.strip("/"), **s3_options)
    raise StorageError(f"unsupported storage URL scheme {parsed.scheme!r}")
