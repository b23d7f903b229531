"""A failed or crashed top-level run (daily-run, follow-ups, urgent-case) is announced on a webhook.

The POST carries the flow, the run's id and name, its state, a message of codes only and a link to the
run in the Prefect UI: never patient data. An exception's own text is forwarded only for the project's
exceptions that are written with ids and codes only; any other exception (a database driver's, say,
whose text may quote the row it choked on) is named by its class alone. With no webhook configured
(``RETROAUTH_ALERT_WEBHOOK_URL``) nothing is sent. The hook never raises: an alert that cannot be
delivered is logged (its status code or error class) and the run's own state stands.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from config.settings import SettingsError, load_settings

# Exceptions whose messages hold ids, codes, file names and counts only (checked by tests/test_urgent.py).
PHI_FREE_EXCEPTIONS = (
    "SendsIncomplete", "PacketsIncomplete", "LettersIncomplete", "OutboxError", "SettingsError",
    "DailyRunIncomplete", "UrgentCaseError",
)
MAX_MESSAGE = 500


def alert_message(state: Any) -> str:
    """What went wrong, in codes: the exception's class (and, for the project's own, its text)."""
    exc = None
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result may be unavailable (crashed, not persisted)
        exc = None
    if isinstance(exc, BaseException):
        name = type(exc).__name__
        if name in PHI_FREE_EXCEPTIONS:
            return f"{name}: {exc}"[:MAX_MESSAGE]
        return f"{name} (details in the run's logs in the Prefect UI)"
    if state.is_crashed():
        return "crashed: the run's process or infrastructure stopped before the run finished"
    return f"{state.name} (details in the run's logs in the Prefect UI)"


def alert_payload(flow: Any, flow_run: Any, state: Any) -> dict[str, Any]:
    """The JSON body: ids, names of flows and states, a message of codes, a link. Nothing else."""
    from prefect.utilities.urls import url_for

    return {
        "source": "retroauth",
        "flow": flow.name,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "deployment_id": str(flow_run.deployment_id) if flow_run.deployment_id else None,
        "state": state.type.value,
        "state_name": state.name,
        "message": alert_message(state),
        "ui_url": url_for("flow-run", obj_id=flow_run.id),
        "occurred_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def post_alert(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_failure`` / ``on_crashed`` hook: POST the payload to the configured webhook, if any."""
    import httpx
    from prefect.logging import get_logger

    logger = get_logger("retroauth.alerts")
    try:
        url = load_settings().alert_webhook_url
    except SettingsError:
        logger.warning("alert not sent: the settings are invalid (see the run's error)")
        return
    if url is None:
        return
    try:
        response = httpx.post(url.get_secret_value(), json=alert_payload(flow, flow_run, state), timeout=10)
        if response.status_code >= 300:
            logger.warning("alert webhook answered HTTP %s", response.status_code)
    except Exception as exc:  # noqa: BLE001 - an alert must never change the run's outcome
        logger.warning("alert webhook not reached: %s", type(exc).__name__)


ALERT_HOOKS: dict[str, list] = {"on_failure": [post_alert], "on_crashed": [post_alert]}
