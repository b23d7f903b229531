"""A small, generic X12 reader: separators from the ISA segment, numbered segments, envelope checks.

Nothing here knows a transaction set: the 835 importer (``retroauth.ingest.remit``) and the 278
writer/reader build on it.

Tokenizing:
- The element separator is the 4th character of the file (``ISA[3]``). The ISA has exactly 16
  elements, so the component separator is ISA16 (the character after the 16th element separator),
  the segment terminator is the character right after ISA16, and the repetition separator is ISA11
  when that is a single non-alphanumeric character (5010; in 4010 ISA11 is the letter ``U``).
  Padding of ISA06/ISA08 is not relied on: an ISA that is not 106 characters long is read the same way.
- Carriage returns and line feeds around segments (``~\\n``) are ignored; blank segments are not
  numbered. Segments are numbered 1, 2, ... from the ISA, over the whole file, which is what error
  reports and problems point at.
- The file is read in chunks, so memory holds one transaction set (ST..SE) at a time, not the file.

Envelope checks (each failure is an ``X12Error`` naming file, segment number, segment id, element):
ISA13 == IEA02, IEA01 == number of GS; GS06 == GE02, GE01 == number of ST; ST02 == SE02,
SE01 == number of segments from ST to SE inclusive; every header has its trailer and every segment
sits inside ST..SE. A transaction set is *intact* when it has an ST and an SE, both checks on it hold,
it sits in a functional group and every segment in it has a valid id. ``read_transactions`` yields the
intact ones and reports everything else, so one broken transaction set (or a broken interchange
trailer) does not stop the intact transaction sets in the same file from being read; callers that
want all-or-nothing pass no ``on_error`` and get the first error raised.

Error messages never quote element values (a value may be a patient's name or member id); counts and
positions are enough to find the problem.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = [
    "Segment",
    "Separators",
    "Transaction",
    "X12Error",
    "check_envelopes",
    "read_segments",
    "read_transactions",
]

_CHUNK = 1 << 20
_SEGMENT_ID = re.compile(r"^[A-Z][A-Z0-9]{1,2}$")
_DIGITS = re.compile(r"[0-9]{1,18}")
_ENVELOPE_IDS = frozenset({"ISA", "IEA", "GS", "GE", "ST", "SE"})
ISA_ELEMENTS = 16


class X12Error(Exception):
    """Something wrong in an X12 file, located precisely; the message never carries a value."""

    def __init__(
        self,
        file: str,
        segment_number: int | None,
        segment_id: str | None,
        element: str | None,
        message: str,
    ):
        self.file = file
        self.segment_number = segment_number
        self.segment_id = segment_id
        self.element = element
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"segment {self.segment_number}" if self.segment_number is not None else "(file)"
        what = " ".join(p for p in (self.segment_id, self.element) if p)
        return f"{self.file}: {where}{' ' + what if what else ''}: {self.message}"

    def __reduce__(self):  # noqa: ANN204 - picklable across processes (Prefect workers)
        return (type(self), (self.file, self.segment_number, self.segment_id, self.element, self.message))


@dataclass(frozen=True)
class Separators:
    element: str
    component: str
    repetition: str | None
    segment: str


class Segment:
    """One segment: ``seg[0]`` is the id, ``seg[1]`` the first element (X12 positions); an element
    the segment does not carry reads as ``""``."""

    __slots__ = ("number", "elements", "separators")

    def __init__(self, number: int, elements: list[str], separators: Separators):
        self.number = number
        self.elements = elements
        self.separators = separators

    @property
    def id(self) -> str:
        return self.elements[0]

    @property
    def valid_id(self) -> bool:
        return bool(_SEGMENT_ID.match(self.elements[0]))

    def __getitem__(self, position: int) -> str:
        return self.elements[position] if 0 <= position < len(self.elements) else ""

    def __len__(self) -> int:
        """The number of elements (trailing empty ones included, as written)."""
        return len(self.elements) - 1

    def __bool__(self) -> bool:  # a segment without elements (``LX``) is still a segment
        return True

    def components(self, position: int) -> list[str]:
        """A composite element split at the component separator (``HC:70551:26`` -> 3 parts)."""
        value = self[position]
        return value.split(self.separators.component) if value else []

    def repeats(self, position: int) -> list[str]:
        """A repeated element split at the repetition separator (5010)."""
        value = self[position]
        if not value:
            return []
        return value.split(self.separators.repetition) if self.separators.repetition else [value]

    def __repr__(self) -> str:  # ids and positions only: a repr ends up in logs and tracebacks
        return f"<Segment {self.number} {self.id if self.valid_id else '?'} ({len(self)} elements)>"


@dataclass
class Transaction:
    """An intact transaction set: ``segments`` runs from its ST to its SE inclusive."""

    file: str
    isa: Segment | None
    gs: Segment
    segments: list[Segment] = field(repr=False)

    @property
    def st(self) -> Segment:
        return self.segments[0]

    @property
    def se(self) -> Segment:
        return self.segments[-1]

    @property
    def set_id(self) -> str:
        """ST01: ``835``, ``278``, ..."""
        return self.st[1]

    @property
    def control_number(self) -> str:
        return self.st[2]

    @property
    def implementation(self) -> str:
        """ST03 (5010), else GS08: ``005010X221A1`` for an 835."""
        return self.st[3] or self.gs[8]

    @property
    def functional_id(self) -> str:
        """GS01: ``HP`` for an 835, ``HI`` for a 278."""
        return self.gs[1]

    @property
    def body(self) -> list[Segment]:
        """The segments between ST and SE."""
        return self.segments[1:-1]


ErrorHandler = Callable[[X12Error], None]


def is_digits(value: str) -> bool:
    """An X12 number: ASCII digits only, and few enough for ``int``. (``str.isdigit`` also accepts
    '²' or '٣', which ``int`` refuses or reads as a digit no X12 file has.)"""
    return _DIGITS.fullmatch(value) is not None


def _raise(error: X12Error) -> None:
    raise error


def _open(source: str | os.PathLike[str] | TextIO) -> tuple[TextIO, bool]:
    if isinstance(source, (str, os.PathLike)):
        # latin-1 never fails to decode; X12 is ASCII (basic/extended character sets).
        return open(source, encoding="latin-1", newline=""), True
    return source, False


def read_segments(
    source: str | os.PathLike[str] | TextIO, *, file: str | None = None
) -> Iterator[Segment]:
    """The segments of an X12 file (a path or an open text stream), numbered from 1 at the ISA.

    Raises ``X12Error`` when the data does not start with a usable ISA, and for a last segment that
    has no terminator (a truncated file): the segments before it are yielded first.
    """
    fh, owned = _open(source)
    name = file if file is not None else _name(source)
    try:
        yield from _tokenize(fh, name)
    finally:
        if owned:
            fh.close()


def _name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return Path(source).name
    return str(getattr(source, "name", "<stream>"))


def _tokenize(fh: TextIO, name: str) -> Iterator[Segment]:
    buf = fh.read(_CHUNK)
    # a byte-order mark (decoded, or UTF-8's bytes read as latin-1) and blank lines before the ISA
    buf = buf.removeprefix("\xef\xbb\xbf").lstrip("\ufeff \t\r\n")
    while len(buf) < 4096:  # the ISA is 106 characters; short reads from a stream: read on
        more = fh.read(_CHUNK)
        if not more:
            break
        buf += more
    seps = _separators(buf, name)
    number = 0
    pending = buf
    while True:
        parts = pending.split(seps.segment)
        pending = parts.pop()  # the text after the last terminator: the start of the next segment
        for raw in parts:
            raw = raw.strip("\r\n")
            if raw:
                number += 1
                yield Segment(number, raw.split(seps.element), seps)
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
    rest = pending.strip("\r\n\t \x00\x1a")  # trailing newline, NUL padding or Ctrl-Z is fine
    if rest:
        first = rest.split(seps.element, 1)[0]
        raise X12Error(name, number + 1, first if _SEGMENT_ID.match(first) else None, None,
                       "the file ends inside this segment (no segment terminator): truncated")  # fmt: skip


def _separators(buf: str, name: str) -> Separators:
    if not buf.startswith("ISA"):
        raise X12Error(name, None, None, None, "not an X12 file: it does not start with an ISA segment")
    if len(buf) < 4:
        raise X12Error(name, 1, "ISA", None, "the ISA segment is incomplete")
    element = buf[3]
    parts = buf.split(element, ISA_ELEMENTS)
    if len(parts) <= ISA_ELEMENTS or len(parts[ISA_ELEMENTS]) < 2:
        raise X12Error(name, 1, "ISA", None, "the ISA segment is incomplete (it needs 16 elements)")
    component, segment = parts[ISA_ELEMENTS][0], parts[ISA_ELEMENTS][1]
    isa11 = parts[11]
    repetition = isa11 if len(isa11) == 1 and not isa11.isalnum() and isa11 != " " else None
    used = [element, component, segment] + ([repetition] if repetition else [])
    if len(set(used)) != len(used):
        raise X12Error(name, 1, "ISA", "ISA16", "the separators are not distinct")
    if any(c.isalnum() or c == " " for c in (element, component)) or segment.isalnum() or segment == " ":
        raise X12Error(name, 1, "ISA", "ISA16", "a separator is a letter, digit or space")
    return Separators(element, component, repetition, segment)


def read_transactions(
    source: str | os.PathLike[str] | TextIO,
    *,
    file: str | None = None,
    on_error: ErrorHandler | None = None,
) -> Iterator[Transaction]:
    """The intact transaction sets of an X12 file, each checked against its envelope.

    ``on_error`` receives every ``X12Error`` found (envelope mismatches, missing trailers, stray
    segments, a truncated file) and reading goes on; without it the first error is raised.
    Interchange- and group-level errors (ISA13/IEA02, GE01, ...) are reported when their trailer is
    read, i.e. after the transaction sets inside have been yielded.
    """
    name = file if file is not None else _name(source)
    report = on_error or _raise
    reader = _Envelopes(name, report)
    segments = read_segments(source, file=name)
    try:
        for seg in segments:
            yield from reader.feed(seg)
    except X12Error as e:  # unreadable start, or a truncated last segment
        report(e)
    finally:
        segments.close()
    reader.finish()


def check_envelopes(text: str, *, file: str = "<x12>") -> list[X12Error]:
    """Every envelope error in an X12 document held in memory (e.g. a 278 this product wrote)."""
    errors: list[X12Error] = []
    for _ in read_transactions(io.StringIO(text), file=file, on_error=errors.append):
        pass
    return errors


class _Envelopes:
    """The ISA/GS/ST state machine behind ``read_transactions``."""

    def __init__(self, name: str, report: ErrorHandler):
        self.name = name
        self.report = report
        self.isa: Segment | None = None
        self.gs: Segment | None = None
        self.st: list[Segment] | None = None
        self.st_broken = False
        self.groups = 0  # GS in the open interchange
        self.sets = 0  # ST in the open group
        self.last = 0  # number of the last segment seen
        self.stray = False  # inside a run of segments outside ST..SE (reported once per run)

    def _error(self, seg: Segment | None, element: str | None, message: str, number: int | None = None) -> None:
        sid = (seg.id if seg.valid_id else None) if seg is not None else None
        if number is None and seg is not None:
            number = seg.number
        self.report(X12Error(self.name, number, sid, element, message))

    def feed(self, seg: Segment) -> Iterator[Transaction]:
        self.last = seg.number
        sid = seg.id
        if not seg.valid_id:
            self._error(seg, None, "not a valid segment id")
            if self.st is not None:
                self.st.append(seg)
                self.st_broken = True
            return
        if sid not in _ENVELOPE_IDS:
            if self.st is not None:
                self.st.append(seg)
            elif not self.stray:
                self.stray = True
                self._error(seg, None, "segment outside a transaction set (ST..SE): it and the segments "
                                       "after it up to the next envelope segment are ignored")  # fmt: skip
            return
        self.stray = False
        if sid == "SE":
            if self.st is None:
                self._error(seg, None, "SE without an ST")
                return
            self.st.append(seg)
            tx = self._close_st(seg)
            if tx is not None:
                yield tx
            return
        # any other envelope segment ends an open transaction set
        if self.st is not None:
            st = self.st[0]
            self._error(st, "SE", f"transaction set has no SE trailer (segment {seg.number} {sid} follows)")
            self.st = None
        if sid == "ST":
            self._open_st(seg)
        elif sid == "GS":
            if self.gs is not None:
                self._error(self.gs, "GE", f"functional group has no GE trailer (segment {seg.number} GS follows)")
            if self.isa is None:
                self._error(seg, None, "GS outside an interchange (no ISA before it)")
            self.gs, self.sets = seg, 0
            self.groups += 1
        elif sid == "GE":
            if self.gs is None:
                self._error(seg, None, "GE without a GS")
            else:
                self._match(seg, 2, self.gs, 6, "GE02", "does not match GS06 (group control number)")
                self._count(seg, 1, self.sets, "GE01", "transaction sets")
            self.gs = None
        elif sid == "ISA":
            if self.gs is not None:
                self._error(self.gs, "GE", f"functional group has no GE trailer (segment {seg.number} ISA follows)")
                self.gs = None
            if self.isa is not None:
                self._error(self.isa, "IEA", f"interchange has no IEA trailer (segment {seg.number} ISA follows)")
            if len(seg) != ISA_ELEMENTS:
                self._error(seg, None, f"ISA has {len(seg)} elements, not {ISA_ELEMENTS}")
            self.isa, self.groups = seg, 0
        elif sid == "IEA":
            if self.gs is not None:
                self._error(self.gs, "GE", f"functional group has no GE trailer (segment {seg.number} IEA follows)")
                self.gs = None
            if self.isa is None:
                self._error(seg, None, "IEA without an ISA")
            else:
                self._match(seg, 2, self.isa, 13, "IEA02", "does not match ISA13 (interchange control number)")
                self._count(seg, 1, self.groups, "IEA01", "functional groups")
            self.isa = None

    def _open_st(self, seg: Segment) -> None:
        self.st = [seg]
        self.st_broken = False
        self.sets += 1
        if self.gs is None:
            self._error(seg, None, "ST outside a functional group (no GS before it)")
            self.st_broken = True

    def _close_st(self, se: Segment) -> Transaction | None:
        segments, self.st = self.st, None
        assert segments is not None
        ok = self._count(se, 1, len(segments), "SE01", "segments from ST to SE")
        ok &= self._match(se, 2, segments[0], 2, "SE02", "does not match ST02 (transaction set control number)")
        if not ok or self.st_broken or self.gs is None:
            return None
        return Transaction(self.name, self.isa, self.gs, segments)

    def _match(self, trailer: Segment, pos: int, header: Segment, header_pos: int, element: str, message: str) -> bool:
        a, b = trailer[pos].strip(), header[header_pos].strip()
        if a == b or (is_digits(a) and is_digits(b) and int(a) == int(b)):
            return True
        self._error(trailer, element, f"{message}, segment {header.number}")
        return False

    def _count(self, trailer: Segment, pos: int, actual: int, element: str, what: str) -> bool:
        value = trailer[pos].strip()
        if not is_digits(value):
            self._error(trailer, element, f"not a count of {what}")
            return False
        if int(value) != actual:
            self._error(trailer, element, f"says {int(value)} {what}, counted {actual}")
            return False
        return True

    def finish(self) -> None:
        end = f"the file ends at segment {self.last}"
        if self.st is not None:
            self._error(self.st[0], "SE", f"transaction set has no SE trailer ({end})")
            self.st = None
        if self.gs is not None:
            self._error(self.gs, "GE", f"functional group has no GE trailer ({end})")
            self.gs = None
        if self.isa is not None:
            self._error(self.isa, "IEA", f"interchange has no IEA trailer ({end})")
            self.isa = None
