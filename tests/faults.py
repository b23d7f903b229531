"""Storage wrappers for tests: count what a run does, or make the store misbehave like a real one."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

from retroauth.storage import Storage, StorageError, StoredObject

FAULTS = ("503", "reset", "slow", "lost_ack")


class CountingStorage:
    """Counts every call by operation (``calls["put"]``) and passes it through."""

    def __init__(self, inner: Storage):
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        self.calls["put"] += 1
        return self.inner.put(key, data, content_type)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        self.calls["get"] += 1
        return self.inner.get(key, sha256)

    def exists(self, key: str) -> bool:
        self.calls["exists"] += 1
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)


class FlakyStorage:
    """Fails about ``rate`` of the calls, chosen by a seeded random, in the ways object stores fail:

    - ``503``: the service refuses (S3 SlowDown / ServiceUnavailable) - nothing happened;
    - ``reset``: the connection drops before the request gets through (ConnectionResetError);
    - ``slow``: the call takes longer but succeeds;
    - ``lost_ack``: a put is written but its answer is lost (TimeoutError): the caller must not
      assume it failed to write, nor that the bytes are wrong.
    """

    def __init__(self, inner: Storage, *, rate: float = 0.2, seed: int = 0, slow_seconds: float = 0.01):
        self.inner, self.rate, self.slow_seconds = inner, rate, slow_seconds
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.faults: Counter[str] = Counter()

    def _draw(self) -> str | None:
        with self._lock:
            r = self._rng.random()
        if r >= self.rate:
            return None
        fault = FAULTS[min(int(r / self.rate * len(FAULTS)), len(FAULTS) - 1)]
        self.faults[fault] += 1
        return fault

    def _before(self, op: str, key: str, fault: str | None) -> None:
        if fault == "503":
            raise StorageError(f"S3 {op} of {key} failed: SlowDown")
        if fault == "reset" or (fault == "lost_ack" and op != "put"):
            raise ConnectionResetError(104, "Connection reset by peer")
        if fault == "slow":
            time.sleep(self.slow_seconds)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        fault = self._draw()
        self._before("put", key, fault)
        stored = self.inner.put(key, data, content_type)
        if fault == "lost_ack":
            raise TimeoutError("read timed out")
        return stored

    def get(self, key: str, sha256: str | None = None) -> bytes:
        self._before("get", key, self._draw())
        return self.inner.get(key, sha256)

    def exists(self, key: str) -> bool:
        self._before("head", key, self._draw())
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self._before("delete", key, self._draw())
        self.inner.delete(key)

    def list(self, prefix: str) -> list[str]:
        self._before("list", prefix, self._draw())
        return self.inner.list(prefix)
