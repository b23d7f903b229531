"""What an import reports: counts per resource type and the problems it found, line by line.

Problems and exceptions name the file, the line, the resource (type/id) and the field, never a value:
a value may be a name, a birth date, a member id or note text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MAX_PROBLEMS = 1000  # kept in the summary; beyond that they are only counted


class IngestError(Exception):
    """An import could not run at all (missing directory, unusable CSV header, bad option)."""


class FieldError(IngestError):
    """One resource cannot be imported because of one field; becomes an ``ImportProblem``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class ImportProblem:
    file: str  # file name within the export directory
    line: int  # 1-based physical line
    resource: str  # "Encounter/<id>", or the type alone when the id is unknown
    field: str  # FHIRPath-like: "period.start", "content[0].attachment.data"; "(json)" for the line
    message: str  # what is wrong, without the value

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.resource}: {self.field}: {self.message}"


@dataclass
class ResourceCounts:
    read: int = 0  # lines (or CSV rows) read
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0  # already there with the same values: not touched
    skipped: int = 0  # deliberately not imported (cancelled, no encounter, duplicate, ...)
    errors: int = 0


@dataclass
class ImportSummary:
    counts: dict[str, ResourceCounts] = field(default_factory=dict)
    problems: list[ImportProblem] = field(default_factory=list)
    problems_not_kept: int = 0  # beyond MAX_PROBLEMS
    ignored: dict[str, int] = field(default_factory=dict)  # lines of resource types not imported
    documents_written: int = 0  # objects put into storage
    documents_unchanged: int = 0  # same bytes already stored: not written again

    def of(self, resource_type: str) -> ResourceCounts:
        return self.counts.setdefault(resource_type, ResourceCounts())

    def add_problem(self, problem: ImportProblem) -> None:
        self.of(problem.resource.split("/", 1)[0]).errors += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.problems_not_kept += 1

    @property
    def error_count(self) -> int:
        return sum(c.errors for c in self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``--json`` output and flow-run artifacts (no patient data in it)."""
        return {
            "counts": {k: asdict(v) for k, v in self.counts.items()},
            "problems": [asdict(p) for p in self.problems],
            "problems_not_kept": self.problems_not_kept,
            "ignored": dict(self.ignored),
            "documents_written": self.documents_written,
            "documents_unchanged": self.documents_unchanged,
        }


def record_import(engine, kind: str, source: str, summary: ImportSummary, started_at) -> int:  # noqa: ANN001
    """Keep the run and every problem it found in the database; return the run id."""
    import sqlalchemy as sa

    from retroauth.db import session_scope
    from retroauth.models import ImportErrorRecord, ImportRun, utcnow

    with session_scope(engine) as s:
        run = ImportRun(kind=kind, source=source[:512], started_at=started_at, finished_at=utcnow(),
                        counts={k: asdict(v) for k, v in summary.counts.items()}, error_count=summary.error_count)
        s.add(run)
        s.flush()
        if summary.problems:
            s.execute(sa.insert(ImportErrorRecord), [
                dict(import_run_id=run.id, file=p.file[:256], line=p.line, record=p.resource[:160],
                     field=p.field[:160], message=p.message[:512])
                for p in summary.problems
            ])
        return run.id
