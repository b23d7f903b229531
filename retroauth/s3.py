"""The S3 backend of object storage (AWS S3 or an S3-compatible endpoint such as MinIO).

Every object is written with server-side encryption and carries two checksums: the sha256 of its
content in the object's metadata (``x-amz-meta-sha256``, what ``get`` verifies end to end) and S3's
own SHA256 checksum, which S3 checks on upload and botocore checks again on download.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3.session
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

from retroauth.storage import IntegrityError, StorageError, StoredObject, check_key, sha256_hex

MiB = 1024 * 1024
SSE_MODES = ("AES256", "aws:kms")
_META_SHA256 = "sha256"  # user metadata, sent as x-amz-meta-sha256
_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


class S3Storage:
    """Objects under ``s3://bucket/prefix``; keys are relative to the prefix and checked before use."""

    put_concurrency = 8  # puts wait on network round trips

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        sse: str = "AES256",
        kms_key_id: str | None = None,
        region: str | None = None,
        max_attempts: int = 8,
        retry_mode: str = "standard",
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        multipart_threshold: int = 8 * MiB,
    ):
        if sse not in SSE_MODES:
            raise StorageError(f"unsupported S3 server-side encryption {sse!r}: AES256 or aws:kms")
        if kms_key_id and sse != "aws:kms":
            raise StorageError("an S3 KMS key id needs sse='aws:kms'")
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = check_key(prefix) if prefix else ""
        self.multipart_threshold = multipart_threshold
        config = Config(
            # botocore's "max_attempts" counts retries only; "total_max_attempts" counts the first try too.
            retries={"total_max_attempts": max_attempts, "mode": retry_mode},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        # A session of our own: the default boto3 session is not safe to share across threads.
        session = boto3.session.Session(region_name=region)
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 * MiB)
        )
        self._sse: dict[str, str] = {"ServerSideEncryption": sse}
        if kms_key_id:
            self._sse["SSEKMSKeyId"] = kms_key_id

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """Turn botocore's errors into StorageError naming the key; S3 error codes carry no content."""
        try:
            yield
        except ClientError as exc:
            code = _code(exc)
            if code in _NOT_FOUND:
                raise StorageError(f"no object at {key}") from exc
            raise StorageError(f"S3 {op} of {key} failed: {code}") from exc
        except FlexibleChecksumError as exc:
            raise IntegrityError(f"S3 checksum mismatch for {key}") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise StorageError(f"S3 {op} of {key} failed: {type(exc).__name__}") from exc

    def _head(self, key: str) -> dict[str, Any] | None:
        """The object's headers, or None when there is no object."""
        full = self._full(key)
        with self._errors("head", key):
            try:
                head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as exc:
                if _code(exc) in _NOT_FOUND:
                    return None
                raise
        return head

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> StoredObject:
        full = self._full(key)
        digest = sha256_hex(data)
        head = self._head(key)
        if head is not None and head.get("Metadata", {}).get(_META_SHA256) == digest:
            return StoredObject(key, digest, len(data))  # same bytes already there: write once
        extra: dict[str, Any] = {**self._sse, "ContentType": content_type, "Metadata": {_META_SHA256: digest}}
        with self._errors("put", key):
            if len(data) > self.multipart_threshold:
                # Parts are checksummed one by one; SSE and metadata go on CreateMultipartUpload.
                self.client.upload_fileobj(
                    io.BytesIO(data),
                    self.bucket,
                    full,
                    ExtraArgs={**extra, "ChecksumAlgorithm": "SHA256"},
                    Config=self._transfer,
                )
            else:
                # Our own digest as S3's checksum: S3 refuses the upload if the bytes it got differ.
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=full,
                    Body=data,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(digest)).decode(),
                    **extra,
                )
        return StoredObject(key, digest, len(data))

    def get(self, key: str, sha256: str | None = None) -> bytes:
        full = self._full(key)
        with self._errors("get", key):
            # ChecksumMode makes botocore verify S3's checksum while reading the body.
            resp = self.client.get_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED")
            data: bytes = resp["Body"].read()
        actual = sha256_hex(data)
        for expected in (sha256, resp.get("Metadata", {}).get(_META_SHA256)):
            if expected is not None and expected != actual:
                raise IntegrityError(f"checksum mismatch for {key}")
        return data

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=full)

    def list(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (a folder-like key, or "" for all), relative to the storage prefix."""
        base = self._full(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        with self._errors("list", prefix or "/"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)
