"""One suite for both storage backends: local files and S3 (a real moto server over HTTP).

The ``storage`` fixture runs each shared case on both; S3-only behaviour (encryption, S3 checksums,
KMS, pagination, prefixes in the bucket) is tested further down against the same server.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from retroauth.s3 import MiB, S3Storage
from retroauth.storage import (
    IntegrityError,
    LocalStorage,
    Storage,
    StorageError,
    key,
    open_storage,
    sha256_hex,
)
from tests.s3server import raw_client

PREFIX = "tenant-1/retroauth"  # the S3 backend always runs under a prefix, so prefixing is exercised


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, PREFIX, endpoint_url=request.getfixturevalue("s3_server"))


@pytest.fixture
def writes(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every object actually written (not skipped as already there) is logged here."""
    log: list[str] = []
    if isinstance(storage, LocalStorage):
        real_replace = os.replace

        def replace(src: Any, dst: Any, **kw: Any) -> None:
            log.append(str(dst))
            real_replace(src, dst, **kw)

        monkeypatch.setattr(os, "replace", replace)
    else:
        assert isinstance(storage, S3Storage)
        for op in ("PutObject", "CreateMultipartUpload"):
            storage.client.meta.events.register(f"before-call.s3.{op}", lambda op=op, **kw: log.append(op))
    return log


def corrupt(storage: Storage, k: str, data: bytes) -> None:
    """Replace an object's bytes behind the backend's back."""
    if isinstance(storage, LocalStorage):
        (storage.root / k).write_bytes(data)
    else:
        assert isinstance(storage, S3Storage)
        client = raw_client(storage.client.meta.endpoint_url)
        client.put_object(Bucket=storage.bucket, Key=f"{storage.prefix}/{k}", Body=data)


# ---- shared cases -------------------------------------------------------------------------------


def test_round_trip(storage: Storage) -> None:
    data = b"%PDF-1.7 clinical note\n" * 100
    k = key("documents", 12, "note.pdf")
    obj = storage.put(k, data, content_type="application/pdf")
    assert (obj.key, obj.sha256, obj.size) == (k, hashlib.sha256(data).hexdigest(), len(data))
    assert storage.get(k) == data
    assert storage.get(k, sha256=obj.sha256) == data
    assert storage.exists(k)
    assert not storage.exists(key("documents", 13, "note.pdf"))


def test_empty_object(storage: Storage) -> None:
    obj = storage.put("empty.bin", b"")
    assert obj.size == 0 and storage.get("empty.bin", sha256=obj.sha256) == b""


def test_put_is_idempotent(storage: Storage, writes: list[str]) -> None:
    data = b"same bytes"
    first = storage.put("letters/1/letter.pdf", data)
    second = storage.put("letters/1/letter.pdf", data)
    assert first == second
    assert len(writes) == 1, "the second put of the same bytes must not write again"


def test_overwrite_with_different_bytes(storage: Storage, writes: list[str]) -> None:
    storage.put("letters/1/letter.pdf", b"draft")
    obj = storage.put("letters/1/letter.pdf", b"final")
    assert len(writes) == 2
    assert obj.sha256 == sha256_hex(b"final")
    assert storage.get("letters/1/letter.pdf", sha256=obj.sha256) == b"final"


def test_missing_key_names_the_key(storage: Storage) -> None:
    with pytest.raises(StorageError, match="documents/404/missing.txt") as info:
        storage.get("documents/404/missing.txt")
    assert not isinstance(info.value, IntegrityError)


def test_delete(storage: Storage) -> None:
    storage.put("a/b.txt", b"x")
    storage.delete("a/b.txt")
    assert not storage.exists("a/b.txt")
    storage.delete("a/b.txt")  # deleting what is gone is not an error
    with pytest.raises(StorageError, match="a/b.txt"):
        storage.get("a/b.txt")


def test_checksum_mismatch_on_read(storage: Storage) -> None:
    obj = storage.put("documents/7/record.txt", b"original record")
    corrupt(storage, "documents/7/record.txt", b"tampered record")
    with pytest.raises(IntegrityError, match="documents/7/record.txt") as info:
        storage.get("documents/7/record.txt", sha256=obj.sha256)
    assert "record" not in str(info.value).replace("documents/7/record.txt", "")


BAD_KEYS = [
    "../escape.txt",
    "a/../../escape.txt",
    "a/..hidden",
    "/abs/path.txt",
    "a//b.txt",
    "a/b/",
    "",
    "with space.txt",
    "a/b c.txt",
    "ünïcode.txt",
    "tab\t.txt",
    "new\nline.txt",
    ".hidden",
    "a\\b.txt",
    "x" * 129,
]


def test_bad_keys_refused_before_any_io(storage: Storage, tmp_path: Path) -> None:
    requests: list[str] = []
    if isinstance(storage, S3Storage):
        storage.client.meta.events.register("before-send.s3", lambda **kw: requests.append("sent"))
    before = sorted(tmp_path.rglob("*"))
    for bad in BAD_KEYS:
        ops: list[Callable[[], object]] = [
            lambda: storage.put(bad, b"data"),
            lambda: storage.get(bad),
            lambda: storage.exists(bad),
            lambda: storage.delete(bad),
        ]
        if bad:  # "" is the whole store for list()
            ops.append(lambda: storage.list(bad))
        for op in ops:
            with pytest.raises(StorageError, match="invalid storage key"):
                op()
    assert requests == []
    assert sorted(tmp_path.rglob("*")) == before
    assert not (tmp_path.parent / "escape.txt").exists()


def test_list_with_prefix(storage: Storage) -> None:
    keys = [
        "documents/1/a.txt",
        "documents/1/b.txt",
        "documents/2/c.txt",
        "documents2/d.txt",  # shares the string prefix, not the folder
        "letters/1/x.pdf",
    ]
    for k in keys:
        storage.put(k, k.encode())
    assert storage.list("documents") == keys[:3]
    assert storage.list("documents/1") == keys[:2]
    assert storage.list("") == sorted(keys)
    assert storage.list("nothing") == []


def test_large_object_round_trip(storage: Storage) -> None:
    data = os.urandom(20 * MiB)
    obj = storage.put("submissions/9/bundle.zip", data)
    assert obj.size == len(data)
    assert storage.get("submissions/9/bundle.zip", sha256=obj.sha256) == data
    if isinstance(storage, S3Storage):
        head = raw_client(storage.client.meta.endpoint_url).head_object(
            Bucket=storage.bucket, Key=f"{PREFIX}/submissions/9/bundle.zip"
        )
        assert head["ETag"].rstrip('"').endswith("-3"), "20 MiB in 8 MiB parts: a 3-part upload"
        assert head["ServerSideEncryption"] == "AES256"
        assert head["Metadata"]["sha256"] == obj.sha256


def test_concurrent_puts_do_not_corrupt(storage: Storage) -> None:
    payloads = [bytes([i]) * (256 * 1024 + i) for i in range(8)]

    def work(i: int) -> None:
        for _ in range(3):
            storage.put("shared/object.bin", payloads[i])
            storage.put(f"own/{i}.bin", payloads[i])
            storage.put(f"new/folders/{i}.bin", payloads[i])  # threads racing to make the same folders

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(8)))
    data = storage.get("shared/object.bin")
    assert data in payloads, "the shared key holds one whole write, never a mix"
    for i, payload in enumerate(payloads):
        assert storage.get(f"own/{i}.bin", sha256=sha256_hex(payload)) == payload
    assert storage.list("") == sorted(["shared/object.bin", *(f"own/{i}.bin" for i in range(8)),
                                       *(f"new/folders/{i}.bin" for i in range(8))])
    if isinstance(storage, LocalStorage):
        assert not [p for p in storage.root.rglob(".tmp-*")], "no temp files left behind"


# ---- local only ---------------------------------------------------------------------------------


def test_local_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a typical umask: without care, folders would come out 0755
    try:
        store = LocalStorage(tmp_path / "store")
        store.put("documents/12/notes/note.txt", b"x")
    finally:
        os.umask(old)
    root = tmp_path / "store"
    for d in (root, root / "documents", root / "documents/12", root / "documents/12/notes"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE((root / "documents/12/notes/note.txt").stat().st_mode) == 0o600


def test_a_folder_made_by_another_writer_meanwhile_is_no_error(tmp_path: Path, monkeypatch) -> None:
    """Two writers of new keys under the same new folders: the folder one makes while the other is making its
    parents is used, not reported as a failure."""
    import retroauth.storage as storage_module

    store = LocalStorage(tmp_path / "store")
    leaf = str(tmp_path / "store" / "letters" / "7")
    real_mkdir, calls = os.mkdir, []

    def mkdir(path, mode=0o777):  # noqa: ANN001
        calls.append(path)
        if path == leaf and calls.count(leaf) == 2:  # its parent is made now: the other writer gets there first
            real_mkdir(path, mode)
        return real_mkdir(path, mode)

    monkeypatch.setattr(storage_module.os, "mkdir", mkdir)
    store.put("letters/7/request.pdf", b"%PDF")
    monkeypatch.undo()
    assert store.get("letters/7/request.pdf") == b"%PDF" and calls.count(leaf) == 2


def test_local_key_through_a_file_is_a_storage_error(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put("a", b"file")
    with pytest.raises(StorageError, match="a/b"):
        store.put("a/b", b"x")
    with pytest.raises(StorageError, match="no object at a/b"):
        store.get("a/b")


# ---- S3 only ------------------------------------------------------------------------------------


@pytest.fixture
def s3(s3_bucket: str, s3_server: str) -> S3Storage:
    return S3Storage(s3_bucket, PREFIX, endpoint_url=s3_server)


def test_s3_every_object_is_encrypted_and_checksummed(s3: S3Storage, s3_server: str) -> None:
    small, large = b"small object", os.urandom(9 * MiB)
    s3.put("a/small.txt", small)
    s3.put("a/large.bin", large)
    client = raw_client(s3_server)
    for name, data in (("small.txt", small), ("large.bin", large)):
        head = client.head_object(Bucket=s3.bucket, Key=f"{PREFIX}/a/{name}", ChecksumMode="ENABLED")
        assert head["ServerSideEncryption"] == "AES256", name
        assert head["Metadata"] == {"sha256": sha256_hex(data)}, name
        assert "ChecksumSHA256" in head, name
    head = client.head_object(Bucket=s3.bucket, Key=f"{PREFIX}/a/small.txt", ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(small).digest()).decode()


def test_s3_kms_encryption(s3_bucket: str, s3_server: str) -> None:
    kms_key = raw_client(s3_server, "kms").create_key(Description="retroauth test")["KeyMetadata"]["KeyId"]
    s3 = S3Storage(s3_bucket, endpoint_url=s3_server, sse="aws:kms", kms_key_id=kms_key, multipart_threshold=5 * MiB)
    s3.put("k/small.txt", b"small")
    s3.put("k/large.bin", os.urandom(6 * MiB))
    client = raw_client(s3_server)
    for name in ("k/small.txt", "k/large.bin"):
        head = client.head_object(Bucket=s3_bucket, Key=name)
        assert head["ServerSideEncryption"] == "aws:kms", name
        assert kms_key in head["SSEKMSKeyId"], name
    assert s3.get("k/small.txt") == b"small"


def test_s3_tampered_bytes_fail_against_stored_metadata(s3: S3Storage, s3_server: str) -> None:
    obj = s3.put("documents/7/record.txt", b"original")
    # Different bytes, but the old metadata copied over: only the read-side check can notice.
    raw_client(s3_server).put_object(
        Bucket=s3.bucket, Key=f"{PREFIX}/documents/7/record.txt", Body=b"tampered", Metadata={"sha256": obj.sha256}
    )
    with pytest.raises(IntegrityError, match="documents/7/record.txt"):
        s3.get("documents/7/record.txt")


def test_s3_keys_live_under_the_prefix(s3: S3Storage, s3_server: str) -> None:
    s3.put("documents/1/a.txt", b"a")
    listed = raw_client(s3_server).list_objects_v2(Bucket=s3.bucket)
    assert [o["Key"] for o in listed["Contents"]] == [f"{PREFIX}/documents/1/a.txt"]
    assert s3.list("") == ["documents/1/a.txt"]


def test_s3_list_follows_pages(s3: S3Storage) -> None:
    keys = [f"p/{i}.txt" for i in range(7)]
    for k in keys:
        s3.put(k, b"x")
    calls: list[int] = []

    def small_pages(params: dict[str, Any], **kw: Any) -> None:
        params["MaxKeys"] = 2
        calls.append(1)

    s3.client.meta.events.register("provide-client-params.s3.ListObjectsV2", small_pages)
    assert s3.list("p") == keys
    assert len(calls) == 4


def test_s3_errors_name_the_key_never_the_content(s3_server: str, aws_env: None) -> None:
    s3 = S3Storage("no-such-bucket-here", endpoint_url=s3_server)
    secret = b"DOE, JANE 1970-01-01 MRN 555"
    with pytest.raises(StorageError, match=r"put of documents/1/a\.txt failed: NoSuchBucket") as info:
        s3.put("documents/1/a.txt", secret)
    assert "DOE" not in str(info.value)


def test_s3_unreachable_endpoint_is_a_storage_error(aws_env: None) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    s3 = S3Storage("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=1)
    assert s3.client.meta.config.retries["total_max_attempts"] == 1
    with pytest.raises(StorageError, match=r"get of a\.txt failed: EndpointConnectionError"):
        s3.get("a.txt")


def test_s3_refuses_unknown_encryption() -> None:
    with pytest.raises(StorageError, match="encryption"):
        S3Storage("bucket", sse="none")
    with pytest.raises(StorageError, match="aws:kms"):
        S3Storage("bucket", kms_key_id="k")
    with pytest.raises(StorageError, match="invalid storage key"):
        S3Storage("bucket", "../up")


# ---- open_storage -------------------------------------------------------------------------------


def test_open_storage_s3(s3_bucket: str, s3_server: str) -> None:
    store = open_storage(f"s3://{s3_bucket}/env/prod/", endpoint_url=s3_server, sse="AES256", kms_key_id=None)
    assert isinstance(store, S3Storage) and store.prefix == "env/prod"
    store.put("a/b.txt", b"hello")
    assert raw_client(s3_server).get_object(Bucket=s3_bucket, Key="env/prod/a/b.txt")["Body"].read() == b"hello"
    bare = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_server)
    assert isinstance(bare, S3Storage) and bare.prefix == ""
    assert bare.get("env/prod/a/b.txt") == b"hello"


def test_open_storage_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_storage(f"file://{tmp_path}/store", endpoint_url="http://ignored", sse="AES256")
    assert isinstance(store, LocalStorage) and store.root == tmp_path / "store"
    store.put("a/b.txt", b"hello")
    assert (tmp_path / "store/a/b.txt").read_bytes() == b"hello"
    monkeypatch.chdir(tmp_path)
    relative = open_storage("file://./var/storage")
    assert isinstance(relative, LocalStorage) and relative.root == tmp_path / "var/storage"
    with pytest.raises(StorageError, match="scheme"):
        open_storage("ftp://host/dir")
