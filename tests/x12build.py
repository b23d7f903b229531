"""Build X12 835 (005010X221A1) remittance files for tests.

The layout follows the implementation guide (and pyx12's 835 map): ISA, GS*HP, then per transaction
ST*835*<control number> (ST03 is not used in the 835 guide; GS08 carries 005010X221A1), BPR, TRN,
DTM*405, loop 1000A (N1*PR, N3, N4, PER*BL), loop 1000B (N1*PE), LX, then per claim CLP, claim
CAS, NM1*QC, MOA (claim remarks), DTM*232/233, and per service SVC, DTM*472, CAS, LQ*HE; SE, GE,
IEA. Amounts balance: a line pays its charge minus its adjustments,
a claim pays its lines' payments minus its own adjustments, BPR02 is the sum of the claims.

``build_835(...)`` returns the segments as lists of elements (so a test can break them on purpose),
``render(...)`` turns them into the file's text with counts and control numbers filled in.
Names and member ids are made up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from pathlib import Path

ELEMENT, COMPONENT, REPETITION, TERMINATOR = "*", ":", "^", "~"

Adjustment = tuple[str, str, Decimal | str]  # (group CO/PR/OA/PI, CARC, amount)


@dataclass
class Service:
    code: str
    charge: Decimal | str
    service_date: date | None = None  # DTM*472
    modifiers: Sequence[str] = ()
    qualifier: str = "HC"
    units: int = 1
    adjustments: Sequence[Adjustment] = ()  # line-level CAS, grouped per group code
    remarks: Sequence[str] = ()  # LQ*HE
    submitted_code: str | None = None  # SVC06 when the payer changed the code

    @property
    def paid(self) -> Decimal:
        return Decimal(self.charge) - sum((Decimal(a[2]) for a in self.adjustments), Decimal(0))


@dataclass
class Claim:
    patient_control_number: str
    services: Sequence[Service] = ()
    status: str = "1"  # CLP02: 1 processed as primary, 4 denied, 22 reversal
    adjustments: Sequence[Adjustment] = ()  # claim-level CAS
    remarks: Sequence[str] = ()  # MOA03.. claim remarks
    statement_from: date | None = None  # DTM*232
    statement_to: date | None = None  # DTM*233
    charge: Decimal | str | None = None  # without services: the claim's charge
    payer_claim_number: str = "PCN0001"

    @property
    def total_charge(self) -> Decimal:
        if self.charge is not None:
            return Decimal(self.charge)
        return sum((Decimal(s.charge) for s in self.services), Decimal(0))

    @property
    def paid(self) -> Decimal:
        claim_adj = sum((Decimal(a[2]) for a in self.adjustments), Decimal(0))
        if self.services:
            return sum((s.paid for s in self.services), Decimal(0)) - claim_adj
        return self.total_charge - claim_adj

    @property
    def patient_responsibility(self) -> Decimal:
        adj = list(self.adjustments) + [a for s in self.services for a in s.adjustments]
        return sum((Decimal(a[2]) for a in adj if a[0] == "PR"), Decimal(0))


@dataclass
class Remittance:
    """One transaction set (ST..SE)."""

    claims: Sequence[Claim]
    payment_date: date = date(2026, 12, 1)  # BPR16
    production_date: date | None = date(2026, 11, 30)  # DTM*405
    control_number: str = "0001"  # ST02
    check_number: str = "CHK12345"
    payee_npi: str = "1234567893"
    extra: list[list[str]] = field(default_factory=list)  # appended before SE (tests of odd input)


def _money(value: Decimal) -> str:
    q = Decimal(value).quantize(Decimal("0.01"))
    text = format(q, "f")
    return text[:-3] if text.endswith(".00") else text.rstrip("0")


def _d8(d: date) -> str:
    return d.strftime("%Y%m%d")


def _cas(adjustments: Sequence[Adjustment]) -> list[list[str]]:
    """CAS segments: one per group code, up to 6 (reason, amount, quantity) triplets each."""
    by_group: dict[str, list[Adjustment]] = {}
    for adj in adjustments:
        by_group.setdefault(adj[0], []).append(adj)
    out = []
    for group, adjs in by_group.items():
        for start in range(0, len(adjs), 6):
            seg = ["CAS", group]
            for _, reason, amount in adjs[start : start + 6]:
                seg += [reason, _money(Decimal(amount)), ""]
            while seg and seg[-1] == "":
                seg.pop()
            out.append(seg)
    return out


def transaction_segments(remit: Remittance) -> list[list[str]]:
    """ST..SE of one 835; SE01 is filled in by ``render``."""
    total = sum((c.paid for c in remit.claims), Decimal(0))
    if total > 0:
        bpr = ["BPR", "I", _money(total), "C", "CHK"] + [""] * 11 + [_d8(remit.payment_date)]
    else:
        bpr = ["BPR", "H", "0", "C", "NON"] + [""] * 11 + [_d8(remit.payment_date)]
    segs: list[list[str]] = [
        # ST03 is "not used" in the 835 guide (unlike the 837 and 278): the version is GS08.
        ["ST", "835", remit.control_number],
        bpr,
        ["TRN", "1", remit.check_number, "1999999999"],
    ]
    if remit.production_date:
        segs.append(["DTM", "405", _d8(remit.production_date)])
    segs += [
        ["N1", "PR", "EXAMPLE HEALTH PLAN"],
        ["N3", "100 MAIN STREET"],
        ["N4", "SPRINGFIELD", "IL", "62701"],
        ["PER", "BL", "EDI SUPPORT", "TE", "8005551212"],
        ["N1", "PE", "EXAMPLE HOSPITAL", "XX", remit.payee_npi],
        ["LX", "1"],
    ]
    for claim in remit.claims:
        segs.append(["CLP", claim.patient_control_number, claim.status, _money(claim.total_charge),
                     _money(claim.paid), _money(claim.patient_responsibility), "12",
                     claim.payer_claim_number, "11", "1"])  # fmt: skip
        segs += _cas(claim.adjustments)
        segs.append(["NM1", "QC", "1", "DOE", "JANE", "", "", "", "MI", "M00000001"])
        if claim.remarks:
            segs.append(["MOA", "", "", *claim.remarks[:5]])
        if claim.statement_from:
            segs.append(["DTM", "232", _d8(claim.statement_from)])
        if claim.statement_to:
            segs.append(["DTM", "233", _d8(claim.statement_to)])
        for svc in claim.services:
            proc = COMPONENT.join([svc.qualifier, svc.code, *svc.modifiers])
            svc_seg = ["SVC", proc, _money(Decimal(svc.charge)), _money(svc.paid), "", str(svc.units)]
            if svc.submitted_code:
                svc_seg += [COMPONENT.join([svc.qualifier, svc.submitted_code])]
            segs.append(svc_seg)
            if svc.service_date:
                segs.append(["DTM", "472", _d8(svc.service_date)])
            segs += _cas(svc.adjustments)
            segs += [["LQ", "HE", r] for r in svc.remarks]
    segs += remit.extra
    segs.append(["SE", "", remit.control_number])
    return segs


def build_835(
    remittances: Sequence[Remittance],
    *,
    interchange_control_number: str = "000000905",
    group_control_number: str = "905",
) -> list[list[str]]:
    """The whole interchange (one functional group) as lists of elements; see ``render``."""
    isa = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", "EXAMPLEPAYER".ljust(15), "ZZ",
           "EXAMPLEHOSP".ljust(15), "261201", "1200", REPETITION, "00501", interchange_control_number,
           "0", "T", COMPONENT]  # fmt: skip
    segs = [isa, ["GS", "HP", "EXAMPLEPAYER", "EXAMPLEHOSP", "20261201", "1200", group_control_number, "X",
                  "005010X221A1"]]  # fmt: skip
    for remit in remittances:
        segs += transaction_segments(remit)
    segs.append(["GE", str(len(remittances)), group_control_number])
    segs.append(["IEA", "1", interchange_control_number])
    return segs


def render(segments: Sequence[Sequence[str]], *, fill_counts: bool = True, newline: bool = True) -> str:
    """The text of the segments; with ``fill_counts`` every empty SE01 gets its real segment count."""
    lines = []
    count = 0
    for seg in segments:
        seg = list(seg)
        if seg[0] == "ST":
            count = 0
        count += 1
        if seg[0] == "SE" and fill_counts and seg[1] == "":
            seg[1] = str(count)
        lines.append(ELEMENT.join(seg) + TERMINATOR)
    return ("\n" if newline else "").join(lines) + ("\n" if newline else "")


def write_835(path: Path, remittances: Sequence[Remittance], **kw: str) -> Path:
    path.write_text(render(build_835(remittances, **kw)), encoding="ascii")
    return path
