"""Settings, from the environment (prefix ``RETROAUTH_``) or a ``.env`` file.

The defaults are the embedded setup: a SQLite file and local files under ``./var``. Production sets
``RETROAUTH_DATABASE_URL=postgresql+psycopg://...`` and ``RETROAUTH_STORAGE_URL=s3://bucket/prefix``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config import PAYERS_DIR
from retroauth.identifiers import npi_is_valid, tin_is_valid

ENV_PREFIX = "RETROAUTH_"


class SettingsError(Exception):
    """Settings that cannot be used; the message names each bad setting by its variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    database_url: str = Field(
        "sqlite:///./var/retroauth.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db",
    )
    storage_url: str = Field(
        "file://./var/storage",
        description="Where documents and letters go: file://DIR or s3://bucket/prefix",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (tests, MinIO)")
    s3_sse: str = Field("AES256", description="S3 server-side encryption: AES256 or aws:kms")
    s3_kms_key_id: str | None = Field(None, description="KMS key id when s3_sse is aws:kms")

    facility_name: str = Field("Riverside Community Hospital", min_length=1)
    facility_address: str = Field("100 Main Street, Springfield, IL 62701", min_length=1)
    facility_phone: str = "217-555-0100"
    facility_contact: str = "Patient Financial Services, Authorization Desk"
    facility_npi: str = "1234567893"
    facility_tin: str = "12-3456789"
    facility_timezone: str = "America/Chicago"

    payer_rules_dir: Path = Field(PAYERS_DIR, description="Directory of payer rule YAML files")
    sweep_lookback_days: int = Field(30, ge=1, le=730, description="Days of encounters each sweep reviews")

    # --- operating it (Prefect): deployments, results, alerts -----------------------------------------
    daily_run_at: str = Field(
        "06:00",
        description="Local time (HH:MM, in facility_timezone) at which the daily-run deployment starts",
    )
    results_dir: Path = Field(
        Path("var/results"),
        description="Where Prefect keeps the results of finished batches (assemble, render) so that a "
        "retried flow run skips them; every worker must read the same directory",
    )
    prefect_database_url: SecretStr | None = Field(
        None,
        description="The Prefect server's own database for `retroauth serve`: unset means SQLite under "
        "var/prefect; postgresql+asyncpg://user:pass@host/db for several workers",
    )
    payer_api_concurrency: int = Field(
        2, ge=1, le=100,
        description="Send batches that may talk to one payer at the same time, across all workers "
        "(the global concurrency limit payer-api-<payer id>)",
    )
    alert_webhook_url: SecretStr | None = Field(
        None,
        description="Where a failed or crashed daily-run, follow-ups or urgent-case run is announced: "
        "an HTTP(S) URL that receives a JSON POST with the flow, run id, state, a message of codes only "
        "and a link to the run (never patient data). Unset: no alert is sent. Kept secret (a webhook URL "
        "often holds a token): `retroauth settings` shows stars",
    )

    prefect_login: SecretStr | None = Field(
        None,
        description="user:password that `retroauth serve`'s Prefect server requires for its UI and API "
        "(PREFECT_SERVER_API_AUTH_STRING); the workers and commands started here send it. Unset: no login, "
        "so keep the server on 127.0.0.1",
    )
    pas_token: SecretStr | None = Field(
        None,
        description="Bearer token for the payers' Da Vinci PAS endpoints (channel fhir_pas). Never logged "
        "or stored in the database; `retroauth settings` shows stars",
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        scheme = urlparse(v).scheme
        if not (scheme.startswith("sqlite") or scheme.startswith("postgresql")):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        return v

    @field_validator("storage_url")
    @classmethod
    def _storage_url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme == "file" and (u.netloc or u.path):
            return v
        if u.scheme == "s3" and len(u.netloc) >= 3:
            return v
        raise ValueError("must be file://DIR or s3://bucket[/prefix] (bucket names have 3+ characters)")

    @field_validator("s3_sse")
    @classmethod
    def _sse(cls, v: str) -> str:
        if v not in ("AES256", "aws:kms"):
            raise ValueError("must be AES256 or aws:kms")
        return v

    @field_validator("facility_npi")
    @classmethod
    def _npi(cls, v: str) -> str:
        if not npi_is_valid(v):
            raise ValueError("is not a valid NPI (10 digits with a correct check digit)")
        return v

    @field_validator("facility_tin")
    @classmethod
    def _tin(cls, v: str) -> str:
        if not tin_is_valid(v):
            raise ValueError("is not a valid TIN (9 digits, NN-NNNNNNN)")
        return v

    @field_validator("facility_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not an IANA time zone such as America/Chicago") from None
        return v

    @field_validator("daily_run_at")
    @classmethod
    def _daily_run_at(cls, v: str) -> str:
        try:
            t = datetime.strptime(v, "%H:%M")
        except ValueError:
            raise ValueError("must be a local time HH:MM such as 06:00") from None
        return f"{t:%H:%M}"

    @field_validator("prefect_database_url", mode="before")
    @classmethod
    def _prefect_db(cls, v: object) -> object:
        v = v.get_secret_value() if isinstance(v, SecretStr) else v
        if v in (None, ""):
            return None
        scheme = urlparse(str(v)).scheme
        if scheme not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
            raise ValueError("must be a postgresql+asyncpg:// (or sqlite+aiosqlite://) URL")
        return v

    @field_validator("alert_webhook_url", mode="before")
    @classmethod
    def _webhook(cls, v: object) -> object:
        v = v.get_secret_value() if isinstance(v, SecretStr) else v
        if v in (None, ""):
            return None
        u = urlparse(str(v))
        if u.scheme not in ("http", "https") or not u.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("payer_rules_dir")
    @classmethod
    def _rules_dir(cls, v: Path) -> Path:
        if not v.is_dir():
            raise ValueError(f"directory {v} does not exist")
        return v


def in_facility_zone(t: datetime, settings: Settings) -> datetime:
    """A time from a person (CLI, UI) without a zone is meant in the facility's zone."""
    return t if t.tzinfo else t.replace(tzinfo=ZoneInfo(settings.facility_timezone))


def daily_run_cron(settings: Settings) -> str:
    """The daily-run schedule as a cron line, read in ``facility_timezone`` (DST-aware in Prefect)."""
    hour, minute = settings.daily_run_at.split(":")
    return f"{int(minute)} {int(hour)} * * *"


def load_settings(**overrides: object) -> Settings:
    """Read the settings, or fail with one line per bad setting naming its environment variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ENV_PREFIX + ".".join(str(p) for p in err["loc"]).upper()
            lines.append(f"{name}: {err['msg']}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
