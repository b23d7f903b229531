"""Sweep detection against the bare SQL query that finds the same rows, in the same run.

For each size: a fresh SQLite database filled by the generator (100 payers: the shipped ones plus
synthetic clones; extra authorizations on file up to ~30% of the lines), then
  1. the bare query: one hand-written SQL statement over the whole window returning the uncovered
     service line ids (what a DBA would write);
  2. the product's sweep end to end (rules loaded, encounters paged, cases upserted and evaluated,
     audit events written) on a copy of the same database;
and both must find the same service lines. Reported: seconds, ratio, lines per second, peak memory.

    .venv/bin/python benchmarks/sweep.py --lines 250000 1000000 4000000 [--json var/bench/sweep.json]

The machine is shared and noisy: read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import Recorder  # noqa: E402
from config import PAYERS_DIR  # noqa: E402
from retroauth.db import make_engine, migrate  # noqa: E402
from retroauth.generate import generate  # noqa: E402
from retroauth.rules import load_rule_library  # noqa: E402

LINES_PER_ENCOUNTER = 2.9  # the generator's mix (see retroauth/generate.py)
END = date(2026, 11, 26)
AS_OF = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)
DAYS = 30

BARE_SQL = """
SELECT DISTINCT sl.id
FROM service_lines sl
JOIN encounters e ON e.id = sl.encounter_id
JOIN coverages c ON c.patient_id = e.patient_id
     AND c.effective_from <= sl.service_date AND COALESCE(c.effective_to, '9999-12-31') >= sl.service_date
JOIN payer_auth_rules r ON r.payer_id = c.payer_id
     AND r.code_system = CASE WHEN sl.code_system = 'CPT' THEN 'HCPCS' ELSE sl.code_system END
     AND length(sl.code) = r.code_len AND sl.code >= r.code_lo AND sl.code <= r.code_hi
     AND r.effective_from <= sl.service_date AND COALESCE(r.effective_to, '9999-12-31') >= sl.service_date
     AND (r.place_of_service IS NULL OR r.place_of_service = e.place_of_service)
     AND (r.encounter_class IS NULL OR r.encounter_class = e.encounter_class)
WHERE e.admitted_at >= :since AND e.admitted_at < :until
  AND (NOT r.requires_partner OR EXISTS (
        SELECT 1 FROM payer_auth_partners p JOIN service_lines sl2 ON sl2.encounter_id = sl.encounter_id
        WHERE p.payer_id = r.payer_id AND p.rule_index = r.rule_index
          AND p.code_system = CASE WHEN sl2.code_system = 'CPT' THEN 'HCPCS' ELSE sl2.code_system END
          AND length(sl2.code) = p.code_len AND sl2.code >= p.code_lo AND sl2.code <= p.code_hi))
  AND NOT EXISTS (
        SELECT 1 FROM authorizations a JOIN authorization_codes ac ON ac.authorization_id = a.id
        WHERE a.payer_id = c.payer_id AND a.member_id = c.member_id AND a.status IN ('approved', 'pending')
          AND a.starts_on <= sl.service_date AND a.ends_on >= sl.service_date
          AND CASE WHEN ac.code_system = 'CPT' THEN 'HCPCS' ELSE ac.code_system END
              = CASE WHEN sl.code_system = 'CPT' THEN 'HCPCS' ELSE sl.code_system END
          AND ac.code = sl.code
          AND (NOT r.provider_specific OR a.provider_npi IS NULL OR a.provider_npi = sl.rendering_npi))
"""


def build(path: Path, lines: int) -> dict:
    """The database, built once per size and cached under benchmarks/.data (it is the slow part)."""
    url = f"sqlite:///{path}"
    migrate(url)
    engine = make_engine(url)
    summary = generate(engine, load_rule_library(PAYERS_DIR), encounters=int(lines / LINES_PER_ENCOUNTER), seed=7,
                       days=DAYS, end=END, extra_payers=92)
    _pad_authorizations(engine, target=int(lines * 0.3))
    engine.dispose()
    return {"library": summary.library}


def _pad_authorizations(engine: sa.Engine, target: int) -> None:
    """Authorizations on file for other services of the same members (a real payer book holds many)."""
    with engine.begin() as conn:
        have = conn.execute(sa.text("select count(*) from authorizations")).scalar_one()
        if have >= target:
            return
        members = conn.execute(sa.text("select payer_id, member_id from coverages")).all()
        next_id = conn.execute(sa.text("select coalesce(max(id), 0) from authorizations")).scalar_one() + 1
        rnd = random.Random(11)
        auths, codes = [], []
        for i in range(target - have):
            payer, member = members[rnd.randrange(len(members))]
            start = END - timedelta(days=rnd.randrange(0, 120))
            auths.append((next_id + i, payer, member, f"PAD{next_id + i}", start.isoformat(),
                          (start + timedelta(days=90)).isoformat()))
            codes.append((next_id + i, "CPT", str(rnd.choice((97110, 97140, 90837, 99490, 76700)))))
        conn.exec_driver_sql(
            "insert into authorizations (id, payer_id, member_id, auth_number, starts_on, ends_on, status, source) "
            "values (?, ?, ?, ?, ?, ?, 'approved', 'import')", auths)
        conn.exec_driver_sql(
            "insert into authorization_codes (authorization_id, code_system, code) values (?, ?, ?)", codes)


def _utc_text(t: datetime) -> str:
    return t.astimezone(timezone.utc).replace(tzinfo=None).isoformat(sep=" ")  # as UTCDateTime stores it


def run_bare(path: Path, library) -> tuple[float, set[int], int]:  # noqa: ANN001
    from retroauth.db import session_scope
    from retroauth.sweep import load_rules

    engine = make_engine(f"sqlite:///{path}")
    with session_scope(engine) as s:
        load_rules(s, library)  # the same rule rows the sweep matches against
    t0 = time.perf_counter()
    with engine.connect() as conn:
        ids = set(conn.execute(sa.text(BARE_SQL), {
            "since": _utc_text(AS_OF - timedelta(days=DAYS + 1)), "until": _utc_text(AS_OF)}).scalars())
    return time.perf_counter() - t0, ids, peak_mb()


def run_sweep(path: Path, library) -> tuple[float, set[int], int]:  # noqa: ANN001
    from retroauth.models import CaseServiceLine
    from retroauth.sweep import sweep

    engine = make_engine(f"sqlite:///{path}")
    t0 = time.perf_counter()
    sweep(engine, library, as_of=AS_OF, lookback_days=DAYS + 1)
    elapsed = time.perf_counter() - t0
    with engine.connect() as conn:
        ids = set(conn.execute(sa.select(CaseServiceLine.service_line_id)).scalars())
    return elapsed, ids, peak_mb()


def peak_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def measure_in_child(mode: str, path: Path, lines: int) -> tuple[float, int, int]:
    """Each measurement in its own process, so peak memory is that step's alone."""
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), str(lines)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1]), int(out[2])


def child(mode: str, path: Path, lines: int) -> None:
    from retroauth.generate import default_payer_ids, synthetic_library

    shipped = load_rule_library(PAYERS_DIR)
    library = synthetic_library(shipped, 92, default_payer_ids(shipped))  # as generate() built it
    elapsed, ids, mb = (run_bare if mode == "bare" else run_sweep)(path, library)
    Path(f"{path}.{mode}.ids").write_text("\n".join(map(str, sorted(ids))))
    print(f"{elapsed:.3f} {len(ids)} {mb}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, nargs="+", default=[250_000, 1_000_000])
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".data")
    ap.add_argument("--json", type=Path, help="write the results here (for benchmarks/report.py)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), int(args.child[2]))
        return
    rec = Recorder("sweep")
    args.data.mkdir(parents=True, exist_ok=True)
    rows, loads = [], []
    for lines in args.lines:
        db = args.data / f"sweep-{lines}.db"
        if not db.exists():
            t0 = time.perf_counter()
            build(db, lines)
            print(f"built {db.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        loads.append([round(x, 2) for x in os.getloadavg()])
        work = Path(tempfile.mkdtemp()) / "work.db"
        shutil.copy(db, work)
        migrate(f"sqlite:///{work}")  # a database cached before a newer migration: bring the copy up to date
        bare_s, bare_n, bare_mb = measure_in_child("bare", work, lines)
        sweep_s, sweep_n, sweep_mb = measure_in_child("sweep", work, lines)
        same = Path(f"{work}.bare.ids").read_text() == Path(f"{work}.sweep.ids").read_text()
        with make_engine(f"sqlite:///{work}").connect() as conn:
            total = conn.execute(sa.text("select count(*) from service_lines")).scalar_one()
        rows.append((total, bare_s, sweep_s, sweep_s / bare_s, total / sweep_s, bare_n, sweep_n, same, bare_mb,
                     sweep_mb))
        shutil.rmtree(work.parent, ignore_errors=True)
    print(f"{'lines':>10} {'bare s':>8} {'sweep s':>8} {'ratio':>6} {'lines/s':>9} {'found':>7} {'same':>5} "
          f"{'bare MB':>8} {'sweep MB':>9}")
    for total, b, s, ratio, lps, bn, sn, same, bmb, smb in rows:
        print(f"{total:>10} {b:>8.2f} {s:>8.2f} {ratio:>6.2f} {lps:>9.0f} {sn:>7} {str(same and bn == sn):>5} "
              f"{bmb:>8} {smb:>9}")
    rec.write(args.json, {"sizes": [
        {"lines_requested": req, "service_lines": total, "bare_seconds": round(b, 3), "sweep_seconds": round(s, 3),
         "ratio": round(ratio, 3), "lines_per_second": round(lps), "found": sn, "same_lines": bool(same and bn == sn),
         "bare_peak_mb": bmb, "sweep_peak_mb": smb, "load_at_start": ld}
        for req, ld, (total, b, s, ratio, lps, bn, sn, same, bmb, smb) in zip(args.lines, loads, rows)]})


if __name__ == "__main__":
    main()
