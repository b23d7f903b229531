"""Thin tasks over letter rendering: one task run per batch of cases, retried with backoff."""

from __future__ import annotations

import os
from datetime import datetime

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from retroauth.letters import (
    LettersIncomplete, cases_to_render, letter_templates, render_letters, templates_dir_of,
)
from tasks import context


def render_workers() -> int:
    """Threads per batch: Typst typesets without the GIL, so one per core (measured in benchmarks/letters.py)."""
    return max(1, min(8, os.cpu_count() or 1))


def _retry_unless_template_problem(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    """A broken template fails the same way every time: only storage and database trouble is retried."""
    try:
        state.result()
    except LettersIncomplete as exc:
        return not exc.template_problem
    except Exception:  # noqa: BLE001 - anything else (database, storage) is worth a retry
        return True
    return False


@task(name="find-cases-to-render", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_cases_to_render(limit: int | None = None) -> list[int]:
    """Ready cases and denied cases with an open appeal (ids only)."""
    return cases_to_render(context.engine(), limit)


@task(name="render-letters", retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5, retry_condition_fn=_retry_unless_template_problem,
      cache_key_fn=context.batch_cache_key, persist_result=True)
def render_batch(case_ids: list[int], as_of: datetime) -> dict:
    """Render, store and record the batch's letters; ready cases move to letter_rendered.

    Failed cases fail the run after the others are committed, so a retry redoes only those (the rest
    are unchanged and write nothing). A template problem is not retried: the message names the
    template file and line to fix. A finished batch keeps its result: a retry of the flow run skips it
    (``context.batch_cache_key``)."""
    s = context.settings()
    result = render_letters(
        context.engine(), context.storage(), s, context.rule_library(), case_ids,
        templates=letter_templates(templates_dir_of(s)), as_of=as_of, actor=context.actor(),
        workers=render_workers(),
    )
    if result.failed:
        raise LettersIncomplete(result.failed)
    return result.as_dict()


@task(name="publish-letter-report")
def publish_letter_report(summary: dict, as_of: datetime) -> None:
    """Counts and failures as a Prefect artifact: case ids, letter ids, template names and codes only."""
    lines = [
        f"# Letters, {as_of:%Y-%m-%d %H:%M %Z}",
        "",
        f"- rendered: **{summary['rendered']}**, unchanged: **{summary['unchanged']}**, "
        f"moved to letter_rendered: **{summary['moved']}**, skipped: **{summary['skipped']}**",
        f"- failed: **{len(summary['failed'])}**",
    ]
    if summary["failed"]:
        lines += ["", "| case | problem |", "|---:|---|",
                  *(f"| {cid} | {msg} |" for cid, msg in sorted(summary["failed"].items(), key=lambda kv: int(kv[0]))[:200])]
    create_markdown_artifact("\n".join(lines), key="letters", description="Request and appeal letters rendered")
