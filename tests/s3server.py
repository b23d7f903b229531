"""A real S3 HTTP endpoint on localhost for the test session: moto's ThreadedMotoServer.

Not moto's in-process ``mock_aws``: boto3 talks HTTP to it exactly as to AWS or MinIO, so request
signing, checksum headers, retries and multipart uploads all go over the wire. Buckets are created
per test (uuid names), so tests never see each other's objects on the shared server.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 (and KMS) server on 127.0.0.1, on a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials and a region; no profile, config file or endpoint from the machine."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def s3_bucket(s3_server: str, aws_env: None) -> str:
    """A fresh, empty bucket on the session's server."""
    name = f"t-{uuid.uuid4().hex}"
    raw_client(s3_server).create_bucket(Bucket=name)
    return name


@functools.cache  # a client takes ~0.2 s to build (service model JSON); clients are thread-safe
def raw_client(endpoint_url: str, service: str = "s3") -> Any:
    """A plain boto3 client on the server, to look at or tamper with objects behind the backend's back."""
    import boto3.session

    return boto3.session.Session(
        aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=DUMMY_ENV["AWS_DEFAULT_REGION"],
    ).client(service, endpoint_url=endpoint_url)
