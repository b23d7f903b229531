"""Thin tasks over packet assembly: one task run per batch of cases, retried with backoff."""

from __future__ import annotations

from datetime import datetime

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.tasks import exponential_backoff

from retroauth.documents import PacketsIncomplete, assemble, cases_needing_packets
from tasks import context


@task(name="find-cases-needing-packets", retries=2, retry_delay_seconds=[5, 30], retry_jitter_factor=0.5)
def find_cases_needing_packets(limit: int | None = None) -> list[int]:
    """Identified, awaiting-documentation and ready cases (ids only)."""
    return cases_needing_packets(context.engine(), limit)


@task(name="assemble-packets", retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=5),
      retry_jitter_factor=0.5, cache_key_fn=context.batch_cache_key, persist_result=True)
def assemble_batch(case_ids: list[int], as_of: datetime) -> dict:
    """Build or refresh the batch's packets. A storage failure fails the run after the other cases are
    done, so the retry (5, 10, 20, 40 s, +-50% jitter) redoes only the failed ones: the rest are unchanged.
    A finished batch keeps its result: a retry of the flow run skips it (``context.batch_cache_key``)."""
    result = assemble(context.engine(), context.storage(), context.rule_library(), case_ids,
                      actor=context.actor(), as_of=as_of)
    if result.failed:
        raise PacketsIncomplete(result.failed)
    return result.as_dict()


@task(name="publish-packet-report")
def publish_packet_report(summary: dict, as_of: datetime) -> None:
    """Counts and what each waiting case lacks, as a Prefect artifact: case ids and item codes only."""
    waiting = sorted(summary["missing"].items(), key=lambda kv: int(kv[0]))
    lines = [
        f"# Documentation packets, {as_of:%Y-%m-%d %H:%M %Z}",
        "",
        f"- built: **{summary['built']}**, unchanged: **{summary['unchanged']}**, "
        f"stale (next run): **{summary['stale']}**, skipped: **{summary['skipped']}**",
        f"- ready: **{summary['ready']}**, awaiting documentation: **{summary['awaiting']}**",
        "",
        "## Awaiting documentation",
        "",
        "| case | missing |",
        "|---:|---|",
        *(f"| {cid} | {', '.join(codes)} |" for cid, codes in waiting[:200]),
    ]
    if len(waiting) > 200:
        lines.append(f"\n... and {len(waiting) - 200} more: `retroauth cases --status awaiting_documentation`")
    create_markdown_artifact("\n".join(lines), key="documentation-packets",
                             description="Packets built and documents still missing")
