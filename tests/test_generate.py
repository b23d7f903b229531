"""The synthetic data generator on SQLite and PostgreSQL: deterministic, realistic, idempotent, sweepable."""

from __future__ import annotations

import itertools
import os
from collections import Counter, defaultdict
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from config import PAYERS_DIR
from retroauth.db import make_engine
from retroauth.generate import (
    TABLES, GenerateError, default_payer_ids, generate, synthetic_library, write_payer_files,
)
from retroauth.matching import COVERING_AUTH_STATUSES
from retroauth.models import (
    Authorization, AuthorizationCode, CaseServiceLine, ClinicalDocument, Coverage, Diagnosis, Encounter, Patient,
    RetroCase, ServiceLine,
)
from retroauth.rules import RuleLibrary, code_family, load_rule_library
from retroauth.storage import LocalStorage, check_key, sha256_hex
from retroauth.sweep import sweep
from tests.conftest import table_counts

LIB = load_rule_library(PAYERS_DIR)
END = date(2026, 11, 20)
CHI = ZoneInfo("America/Chicago")
_n = itertools.count()


@pytest.fixture
def other_engine(request, db_url, tmp_path):
    """A second fresh, migrated database on the same backend as ``engine``."""
    if db_url.startswith("sqlite"):
        path = tmp_path / "other.db"
        path.write_bytes(request.getfixturevalue("sqlite_template").read_bytes())
        url = f"sqlite:///{path}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = f"g{os.getpid()}_{next(_n)}"
        cluster.execute(f"CREATE DATABASE {name} TEMPLATE retroauth_template")
        url = cluster.url(name)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def dump(engine: sa.Engine, source_system: str | None = None) -> dict[str, list[tuple]]:
    """Every generated row, in id order (optionally only one set's patients and encounters)."""
    out = {}
    with engine.connect() as c:
        for t in TABLES:
            table = SQLModel.metadata.tables[t]
            q = sa.select(table).order_by(table.c.id)
            if source_system and "source_system" in table.c:
                q = q.where(table.c.source_system == source_system)
            out[t] = [tuple(r) for r in c.execute(q)]
    return out


def run_sweep(engine: sa.Engine, library: RuleLibrary, days: int):
    as_of = datetime.combine(END + timedelta(days=1), time(0), CHI)
    return sweep(engine, library, as_of=as_of, lookback_days=days)


def expected_uncovered(engine: sa.Engine, library: RuleLibrary) -> tuple[int, set[int]]:
    """(lines needing authorization, ids of those without one), by the Python reference rules."""
    with engine.connect() as c:
        enc = {r.id: r for r in c.execute(sa.select(
            Encounter.id, Encounter.patient_id, Encounter.encounter_class, Encounter.place_of_service))}
        cov = {r.patient_id: r for r in c.execute(sa.select(Coverage.patient_id, Coverage.payer_id, Coverage.member_id))}
        lines = c.execute(sa.select(ServiceLine.id, ServiceLine.encounter_id, ServiceLine.code_system, ServiceLine.code,
                                    ServiceLine.service_date, ServiceLine.rendering_npi)).all()
        auths = defaultdict(list)
        for a in c.execute(sa.select(Authorization.payer_id, Authorization.member_id, Authorization.starts_on,
                                     Authorization.ends_on, Authorization.status, Authorization.provider_npi,
                                     AuthorizationCode.code_system, AuthorizationCode.code)
                           .join(AuthorizationCode, AuthorizationCode.authorization_id == Authorization.id)):
            auths[(a.payer_id, a.member_id)].append(a)
    by_encounter = defaultdict(list)
    for line in lines:
        by_encounter[line.encounter_id].append(line)
    needing, uncovered = 0, set()
    for line in lines:
        e = enc[line.encounter_id]
        cv = cov[e.patient_id]
        others = [(o.code_system, o.code) for o in by_encounter[e.id] if o.id != line.id]
        rules = library.rules_requiring_auth(cv.payer_id, line.code_system, line.code, line.service_date,
                                             e.place_of_service, e.encounter_class, others)
        if not rules:
            continue
        needing += 1

        def covered(provider_specific: bool) -> bool:
            return any(
                a.status in COVERING_AUTH_STATUSES and a.starts_on <= line.service_date <= a.ends_on
                and code_family(a.code_system) == code_family(line.code_system) and a.code == line.code
                and (not provider_specific or a.provider_npi in (None, line.rendering_npi))
                for a in auths[(cv.payer_id, cv.member_id)])

        if any(not covered(r.provider_specific) for r in rules):
            uncovered.add(line.id)
    return needing, uncovered


def swept_lines(engine: sa.Engine) -> set[int]:
    with engine.connect() as c:
        return set(c.execute(sa.select(CaseServiceLine.service_line_id)).scalars())


def test_same_seed_same_rows_different_seed_differs(engine, other_engine):
    a = generate(engine, LIB, encounters=300, seed=5, days=10, end=END)
    b = generate(other_engine, LIB, encounters=300, seed=5, days=10, end=END, chunk_encounters=37)
    assert not a.skipped and a.encounters == 300
    assert dump(engine) == dump(other_engine)  # the chunk size does not change the output either
    assert a.as_dict() | {"seconds": 0} == b.as_dict() | {"seconds": 0}

    c = generate(engine, LIB, encounters=300, seed=6, days=10, end=END)
    assert not c.skipped
    with engine.connect() as conn:
        codes = {s: [r.code for r in conn.execute(
            sa.select(ServiceLine.code).join(Encounter).where(Encounter.source_system == s).order_by(ServiceLine.id))]
            for s in ("gen:5", "gen:6")}
    assert codes["gen:5"] != codes["gen:6"]
    # The second set took the next ids: both sets live side by side.
    assert table_counts(engine)["encounters"] == 600


def test_proportions_rerun_and_sweep(engine):
    done: list[int] = []
    s = generate(engine, LIB, encounters=2000, seed=11, days=30, end=END, progress=done.append, chunk_encounters=500)
    assert done[-1] == 2000 and len(done) >= 4
    assert set(s.payer_ids) == set(default_payer_ids(LIB)) and "synthea-demo-health" not in s.payer_ids

    with engine.connect() as c:
        classes = Counter(dict(c.execute(sa.select(Encounter.encounter_class, sa.func.count())
                                         .group_by(Encounter.encounter_class)).all()))
        per_encounter = c.execute(sa.select(Encounter.encounter_class, sa.func.count(ServiceLine.id))
                                  .join(ServiceLine).group_by(Encounter.id, Encounter.encounter_class)).all()
        discovery = Counter(dict(c.execute(sa.select(Coverage.discovery_method, sa.func.count())
                                           .group_by(Coverage.discovery_method)).all()))
        payers = Counter(dict(c.execute(sa.select(Coverage.payer_id, sa.func.count()).group_by(Coverage.payer_id)).all()))
        dx = Counter(c.execute(sa.select(sa.func.count()).select_from(Diagnosis).group_by(Diagnosis.encounter_id)).scalars())
        docs = set(c.execute(sa.select(Encounter.encounter_class, ClinicalDocument.loinc_type).join(ClinicalDocument)).all())
        issues = c.execute(sa.select(sa.func.count()).where(Encounter.system_issue_reference.is_not(None))).scalar_one()
        names = set(c.execute(sa.select(Patient.family_name)).scalars())
        admitted = c.execute(sa.select(sa.func.min(Encounter.admitted_at), sa.func.max(Encounter.admitted_at))).one()
        late = c.execute(sa.select(sa.func.count()).select_from(Coverage)
                         .join(Encounter, Encounter.patient_id == Coverage.patient_id)
                         .where(Coverage.discovered_at > Encounter.admitted_at)).scalar_one()

    share = {k: v / 2000 for k, v in classes.items()}
    for cls, expected, tol in (("outpatient", .70, .04), ("emergency", .15, .03), ("inpatient", .08, .02),
                               ("observation", .04, .015), ("home_health", .02, .01), ("virtual", .01, .008)):
        assert abs(share[cls] - expected) <= tol, (cls, share[cls])
    sizes = defaultdict(set)
    for cls, n in per_encounter:
        sizes[cls].add(n)
    assert min(sizes["outpatient"]) == 1 and max(sizes["outpatient"]) <= 5  # 1-4, plus a pair rule's partner
    assert min(sizes["inpatient"]) >= 4 and max(sizes["inpatient"]) >= 10
    assert 2.5 <= s.service_lines / 2000 <= 3.3
    assert 0.035 <= s.auth_required_lines / s.service_lines <= 0.065
    assert 0.06 <= s.unauthorized_lines / s.auth_required_lines <= 0.20  # 12.5% expected
    assert 0.02 <= discovery["eligibility_check"] / s.coverages <= 0.08
    assert discovery["retroactive_eligibility"] / s.coverages <= 0.03 and late > 0
    assert payers.most_common(1)[0][0] == "medicare-ffs-opd" and len(payers) == 7
    assert set(dx) <= {1, 2, 3} and dx[1] > dx[3]
    assert {("emergency", "34111-5"), ("inpatient", "34117-2"), ("outpatient", "11506-3")} <= docs
    assert issues <= 30
    assert "Testperson" in names or "Example" in names
    lo, hi = (t.astimezone(CHI).date() for t in admitted)
    assert END - timedelta(days=29) <= lo and hi <= END

    # Same seed and arguments again: skipped, nothing changes. Other arguments: refused.
    before = table_counts(engine)
    again = generate(engine, LIB, encounters=2000, seed=11, days=30, end=END)
    assert again.skipped and again.service_lines == s.service_lines and table_counts(engine) == before
    with pytest.raises(GenerateError, match="gen:11 already holds a generated set made with other arguments"):
        generate(engine, LIB, encounters=2001, seed=11, days=30, end=END)
    assert table_counts(engine) == before

    # The sweep finds exactly the auth-required lines without an authorization: the codes match the rules.
    needing, uncovered = expected_uncovered(engine, LIB)
    assert needing == s.auth_required_lines and len(uncovered) == s.unauthorized_lines
    result = run_sweep(engine, LIB, days=30)
    assert result.encounters_scanned == 2000
    assert result.lines_uncovered == s.unauthorized_lines
    assert swept_lines(engine) == uncovered


def test_extra_payers_get_rules_the_sweep_matches(engine, tmp_path):
    s = generate(engine, LIB, encounters=800, seed=3, days=5, end=END, extra_payers=12)
    lib = s.library
    synthetic = [p for p in s.payer_ids if p.startswith("gen-payer-")]
    assert synthetic == [f"gen-payer-{k:03d}" for k in range(1, 13)] and len(s.payer_ids) == 19
    clone = lib["gen-payer-001"]
    template = LIB[default_payer_ids(LIB)[0]]
    assert clone.authorization_required == template.authorization_required and clone.id == "gen-payer-001"
    # The clones do not depend on the seed: the same id means the same rules in every set.
    assert synthetic_library(LIB, 12)["gen-payer-012"] == lib["gen-payer-012"]

    with engine.connect() as c:
        on_synthetic = c.execute(sa.select(sa.func.count()).select_from(Coverage)
                                 .where(Coverage.payer_id.like("gen-payer-%"))).scalar_one()
    assert on_synthetic > 100

    result = run_sweep(engine, lib, days=5)
    _, uncovered = expected_uncovered(engine, lib)
    assert result.lines_uncovered == s.unauthorized_lines == len(uncovered) and swept_lines(engine) == uncovered
    with engine.connect() as c:
        case_payers = set(c.execute(sa.select(RetroCase.payer_id)).scalars())
    assert any(p.startswith("gen-payer-") for p in case_payers)

    # Written as rule files, they load back as the same rules (for a sweep run from the command line).
    write_payer_files(lib, synthetic, tmp_path / "payers")
    assert dict(load_rule_library(tmp_path / "payers")) == {p: lib[p] for p in synthetic}


def test_documents_are_metadata_only_unless_asked(tmp_path, engine):
    s = generate(engine, LIB, encounters=150, seed=9, days=3, end=END)
    storage = LocalStorage(tmp_path / "objects")
    with engine.connect() as c:
        docs = c.execute(sa.select(ClinicalDocument.storage_key, ClinicalDocument.sha256,
                                   ClinicalDocument.size_bytes)).all()
    assert len(docs) == s.clinical_documents > 0 and s.documents_written == 0
    assert all(check_key(d.storage_key) and not storage.exists(d.storage_key) for d in docs)

    # Asked for on the existing set: the missing placeholder bodies are written, matching the rows.
    again = generate(engine, LIB, encounters=150, seed=9, days=3, end=END, documents=True, storage=storage)
    assert again.skipped and again.documents_written == len(docs)
    for d in docs:
        body = storage.get(d.storage_key, sha256=d.sha256)
        assert len(body) == d.size_bytes and b"SYNTHETIC" in body
    assert generate(engine, LIB, encounters=150, seed=9, days=3, end=END, documents=True,
                    storage=storage).documents_written == 0

    fresh = generate(engine, LIB, encounters=50, seed=10, days=3, end=END, documents=True, storage=storage)
    assert fresh.documents_written == fresh.clinical_documents
    with engine.connect() as c:
        keys = c.execute(sa.select(ClinicalDocument.storage_key, ClinicalDocument.sha256)
                         .where(ClinicalDocument.source_system == "gen:10")).all()
    assert all(sha256_hex(storage.get(k)) == h for k, h in keys)


def test_bad_arguments_are_refused(engine):
    with pytest.raises(GenerateError, match="unknown payer ids: nope"):
        generate(engine, LIB, encounters=10, seed=1, days=1, end=END, payer_ids=["nope"])
    with pytest.raises(GenerateError, match="needs a storage"):
        generate(engine, LIB, encounters=10, seed=1, days=1, end=END, documents=True)
    assert table_counts(engine)["patients"] == 0
