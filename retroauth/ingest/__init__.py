"""Getting records in: FHIR bulk exports (``fhir``), with the shared upsert (``upsert``) and report
types (``errors``) that the CSV and 835 importers reuse."""

from retroauth.ingest.errors import ImportProblem, ImportSummary, IngestError, ResourceCounts
from retroauth.ingest.fhir import Progress, import_fhir
from retroauth.ingest.upsert import UpsertResult, upsert

__all__ = [
    "ImportProblem",
    "ImportSummary",
    "IngestError",
    "Progress",
    "ResourceCounts",
    "UpsertResult",
    "import_fhir",
    "upsert",
]
