"""Thin tasks for one urgent encounter or case: find it, report where its cases stand."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact

from retroauth.worklist import case_statuses, encounter_exists, encounter_of_case
from tasks import context


class UrgentCaseError(ValueError):
    """An urgent request that cannot be run as asked; the message holds ids only."""


def _retry_unless_not_found(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """A missing encounter or case stays missing: only database trouble is worth a retry."""
    try:
        state.result()
    except UrgentCaseError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


@task(name="find-urgent-encounter", retries=2, retry_delay_seconds=[2, 10], retry_jitter_factor=0.5,
      retry_condition_fn=_retry_unless_not_found)
def find_encounter(encounter_id: int | None, case_id: int | None) -> int:
    """The encounter to sweep: the one given, or the given case's."""
    engine = context.engine()
    if case_id is not None:
        found = encounter_of_case(engine, case_id)
        if found is None:
            raise UrgentCaseError(f"case {case_id} not found")
        return found
    if not encounter_exists(engine, encounter_id):
        raise UrgentCaseError(f"encounter {encounter_id} not found")
    return encounter_id


@task(name="case-statuses")
def statuses(case_ids: list[int]) -> dict[int, str]:
    return case_statuses(context.engine(), case_ids)


@task(name="publish-urgent-report")
def publish_urgent_report(encounter_id: int, statuses: dict[int, str], sent: int) -> None:
    """Artifact ``urgent-case``: the encounter, its cases and their statuses (ids and codes only)."""
    lines = [f"# Urgent: encounter {encounter_id}", "", f"- submissions sent now: **{sent}**", ""]
    if statuses:
        lines += ["| case | status |", "|---:|---|",
                  *(f"| {cid} | {status} |" for cid, status in sorted(statuses.items())),
                  "", "Details: `retroauth case show ID`."]
    else:
        lines.append("No service of this encounter needs a retro request: no case.")
    create_markdown_artifact("\n".join(lines), key="urgent-case", description="One encounter, now")
