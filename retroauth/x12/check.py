"""A structural checker for X12 278 (005010X217) files: what a translator would reject before any
business rule looks at the content.

``check_278(text)`` returns every problem found as an ``X12Error`` (file, segment number, segment id,
element, message), sorted by segment number; an empty list means the file passed. The messages never
quote an element's value (it may be a patient's name or member id): positions, counts and codes only.

What is checked:
- the envelope, through ``retroauth.x12.parse.check_envelopes``: SE01 equals the number of segments
  from ST to SE, ST02 == SE02, GS06 == GE02, ISA13 == IEA02, GE01 == the number of ST in the group,
  IEA01 == the number of GS in the interchange, every header has its trailer, valid segment ids,
  no truncated last segment;
- the ISA is fixed width: 106 characters, every element at its fixed width;
- GS01 is ``HI``, GS08 and ST03 are ``005010X217``, ST01 is ``278``;
- no empty segment (two segment terminators in a row);
- separators never appear inside data: every known segment has an element count within the bounds
  the 278 guide uses (an element separator inside a name adds an element), the component separator
  appears only in composite elements, the repetition separator nowhere (no element of the 278
  repeats), no control characters inside elements, no trailing empty element or component; a
  segment id the 278 does not use is reported too (a segment terminator inside data starts a
  segment whose "id" is the rest of the data);
- per transaction set: BHT right after ST (BHT01 ``0007``, BHT02 a known purpose), the HL tree (HL01
  counts 1, 2, 3... in order; HL02 is empty for the root and otherwise points at an earlier HL that
  is still open, i.e. an ancestor of the previous HL; HL03 levels nest 20 > 21 > 22 > (23 >) EV > SS;
  HL04 says whether children follow and they do), no segment between BHT and the first HL, and the
  levels a request needs (20, 21, 22, EV; a response needs only 20: a rejected request may be
  answered at the payer level only). In a request every 20/21/22 level has its NM1, every EV a TRN
  and a UM, every SS a UM.

``transaction_problems`` (the per-transaction checks) is shared with the 278 response reader.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

from retroauth.x12.parse import (
    ISA_ELEMENTS, Segment, Separators, X12Error, check_envelopes, is_digits, read_segments,
)  # fmt: skip

__all__ = ["IMPLEMENTATION", "LEVEL_PARENTS", "SEGMENT_BOUNDS", "check_278", "segment_problems",
           "transaction_problems"]  # fmt: skip

IMPLEMENTATION = "005010X217"
ISA_LENGTH = 106
ISA_WIDTHS = (2, 10, 2, 10, 2, 15, 2, 15, 6, 4, 1, 5, 9, 1, 1, 1)

# Segment id: (fewest elements, most elements, positions of composite elements). The maxima are the
# last position the 278 guide uses (not the base standard's), so that an element separator inside a
# name or an id shows up as one element too many. Bounds cover the request and the response.
SEGMENT_BOUNDS: dict[str, tuple[int, int, frozenset[int]]] = {
    "ISA": (16, 16, frozenset()),
    "GS": (8, 8, frozenset()),
    "ST": (2, 3, frozenset()),
    "BHT": (5, 6, frozenset()),
    "HL": (4, 4, frozenset()),
    "AAA": (3, 4, frozenset()),
    "NM1": (2, 9, frozenset()),
    "REF": (2, 3, frozenset()),
    "N3": (1, 2, frozenset()),
    "N4": (1, 7, frozenset()),
    "PER": (1, 8, frozenset()),
    "PRV": (3, 3, frozenset()),
    "DMG": (2, 3, frozenset()),
    "INS": (2, 17, frozenset()),
    "TRN": (3, 4, frozenset()),
    "UM": (1, 10, frozenset({4, 5})),
    "HCR": (1, 4, frozenset()),
    "DTP": (3, 3, frozenset()),
    "HI": (1, 12, frozenset(range(1, 13))),
    "HSD": (1, 8, frozenset()),
    "CRC": (3, 7, frozenset()),
    "CL1": (1, 4, frozenset()),
    "CR1": (1, 10, frozenset()),
    "CR2": (1, 12, frozenset()),
    "CR5": (1, 18, frozenset()),
    "CR6": (1, 21, frozenset()),
    "CR7": (1, 3, frozenset()),
    "PWK": (2, 8, frozenset({8})),
    "MSG": (1, 1, frozenset()),
    "SV1": (1, 21, frozenset({1, 7})),
    "SV2": (1, 10, frozenset({2})),
    "SV3": (1, 11, frozenset({1, 4})),
    "TOO": (2, 3, frozenset({3})),
    "SE": (2, 2, frozenset()),
    "GE": (2, 2, frozenset()),
    "IEA": (2, 2, frozenset()),
}

# HL03 level: the levels its parent may have (None: the root, no parent).
LEVEL_PARENTS: dict[str, tuple[str | None, ...]] = {
    "20": (None,),
    "21": ("20",),
    "22": ("21",),
    "23": ("22",),
    "EV": ("22", "23"),
    "SS": ("EV",),
}
LEVEL_NAMES = {
    "20": "utilization management organization",
    "21": "requester",
    "22": "subscriber",
    "23": "dependent",
    "EV": "patient event",
    "SS": "service",
}
# BHT02: 13 request, 11 response, 01 cancellation (of a request), 18 reissue (a response sent again).
PURPOSES = {"13": "request", "01": "request", "11": "response", "18": "response"}
REQUEST_LEVELS = ("20", "21", "22", "EV")
RESPONSE_LEVELS = ("20",)


def _err(file: str, seg: Segment, element: str | None, message: str) -> X12Error:
    return X12Error(file, seg.number, seg.id if seg.valid_id else None, element, message)


def check_278(text: str, file: str = "<278>") -> list[X12Error]:
    """Every structural problem of a 278 held in memory (see the module docstring); [] when none."""
    errors = list(check_envelopes(text, file=file))
    segments: list[Segment] = []
    try:
        segments.extend(read_segments(io.StringIO(text), file=file))
    except X12Error:
        pass  # no usable ISA, or a truncated last segment: check_envelopes reported it
    if not segments:
        return errors
    errors += _empty_segments(text, segments[0].separators, file)
    for seg in segments:
        errors += segment_problems(seg, file)
        if seg.id == "GS":
            if seg[1] != "HI":
                errors.append(_err(file, seg, "GS01", "is not HI (health care services review)"))
            if seg[8] != IMPLEMENTATION:
                errors.append(_err(file, seg, "GS08", f"is not {IMPLEMENTATION}"))
    for tx in _transaction_sets(segments):
        errors += transaction_problems(tx, file)
    errors.sort(key=lambda e: e.segment_number or 0)
    return errors


def _empty_segments(text: str, seps: Separators, file: str) -> list[X12Error]:
    """Two segment terminators in a row: the tokenizer skips the empty segment, the syntax forbids it."""
    body = text.removeprefix("\xef\xbb\xbf").lstrip("\ufeff \t\r\n")
    errors = []
    number, last_id = 0, None
    for piece in body.split(seps.segment)[:-1]:
        raw = piece.strip("\r\n")
        if raw:
            number += 1
            last_id = raw.split(seps.element, 1)[0]
        else:
            errors.append(X12Error(file, number or None, last_id if last_id and last_id.isalnum() else None, None,
                                   "followed by an empty segment (two segment terminators in a row)"))  # fmt: skip
    return errors


def segment_problems(seg: Segment, file: str) -> list[X12Error]:
    """Syntax problems of one segment: ISA width, element counts, separators and control characters in data."""
    if not seg.valid_id:
        return []  # check_envelopes reports an invalid id
    sid = seg.id
    if sid == "ISA":
        return _isa_problems(seg, file)
    bounds = SEGMENT_BOUNDS.get(sid)
    if bounds is None:
        return [_err(file, seg, None, "not a segment of the 278 (005010X217): stray data or a segment "
                                      "terminator inside an element?")]  # fmt: skip
    least, most, composites = bounds
    errors = []
    n = len(seg)
    if n < least:
        errors.append(_err(file, seg, None, f"has {n} elements, the 278 needs at least {least}"))
    elif n > most:
        errors.append(_err(file, seg, None, f"has {n} elements, the 278 uses at most {most}: "
                                            "an element separator inside data?"))  # fmt: skip
    if n and seg.elements[-1] == "":
        errors.append(_err(file, seg, f"{sid}{n:02d}", "empty last element (trailing element separator)"))
    seps = seg.separators
    for pos in range(1, n + 1):
        value = seg[pos]
        name = f"{sid}{pos:02d}"
        if seps.repetition and seps.repetition in value:
            errors.append(_err(file, seg, name, "contains the repetition separator (no element of the 278 repeats)"))
        if seps.component in value:
            if pos not in composites:
                errors.append(_err(file, seg, name, "contains the component separator but is not a composite"))
            elif value.endswith(seps.component):
                errors.append(_err(file, seg, name, "empty last component (trailing component separator)"))
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            errors.append(_err(file, seg, name, "contains a control character"))
    return errors


def _isa_problems(seg: Segment, file: str) -> list[X12Error]:
    if len(seg) != ISA_ELEMENTS:
        return []  # check_envelopes reports the element count
    length = len(seg.separators.element.join(seg.elements)) + 1
    for pos, width in enumerate(ISA_WIDTHS, start=1):
        if len(seg[pos]) != width:
            return [_err(file, seg, f"ISA{pos:02d}", f"is {len(seg[pos])} characters, not {width}: the ISA is "
                                                     f"fixed width ({length} characters, not {ISA_LENGTH})")]  # fmt: skip
    return []


def _transaction_sets(segments: Sequence[Segment]) -> Iterator[list[Segment]]:
    """ST..SE runs (an ST without its SE runs to the next envelope segment)."""
    current: list[Segment] | None = None
    for seg in segments:
        if seg.id == "ST":
            if current:
                yield current
            current = [seg]
        elif seg.id in ("SE", "GS", "GE", "ISA", "IEA"):
            if current is not None:
                if seg.id == "SE":
                    current.append(seg)
                yield current
                current = None
        elif current is not None:
            current.append(seg)
    if current:
        yield current


def transaction_problems(segments: Sequence[Segment], file: str) -> list[X12Error]:
    """The 278 rules of one transaction set, ``segments`` running from its ST (to its SE, if any)."""
    st = segments[0]
    body = list(segments[1:-1] if segments[-1].id == "SE" and len(segments) > 1 else segments[1:])
    errors: list[X12Error] = []

    def err(seg: Segment, element: str | None, message: str) -> None:
        errors.append(_err(file, seg, element, message))

    if st[1] != "278":
        err(st, "ST01", "is not 278")
    if st[3] and st[3] != IMPLEMENTATION:
        err(st, "ST03", f"is not {IMPLEMENTATION}")
    bhts = [s for s in body if s.id == "BHT"]
    if not bhts:
        err(st, "BHT", "transaction set has no BHT segment (required right after ST)")
    elif body[0] is not bhts[0]:
        err(bhts[0], None, "BHT must be the first segment after ST")
    for extra in bhts[1:]:
        err(extra, None, "a second BHT in the transaction set")
    purpose = None
    if bhts:
        bht = bhts[0]
        if bht[1] != "0007":
            err(bht, "BHT01", "is not 0007 (information source, receiver, subscriber, dependent)")
        purpose = PURPOSES.get(bht[2])
        if purpose is None:
            err(bht, "BHT02", "is not 13 (request), 01 (cancellation), 11 (response) or 18 (reissue)")

    levels: dict[int, str] = {}  # HL01 -> HL03
    hl_segments: dict[int, Segment] = {}
    children: dict[int, int] = {}
    open_path: list[int] = []  # the previous HL and its ancestors: where the next HL may attach
    contents: dict[int, set[str]] = {}  # HL01 -> ids of the segments in its level
    current: int | None = None
    position = 0
    for seg in body:
        if seg.id == "BHT":
            continue
        if seg.id != "HL":
            if position == 0:
                if seg.valid_id:
                    err(seg, None, "segment before the first HL (only BHT comes before the hierarchy)")
            elif current is not None:
                contents[current].add(seg.id)
            continue
        position += 1
        number: int | None = None
        if not is_digits(seg[1]):
            err(seg, "HL01", "is not a number")
        else:
            number = int(seg[1])
            if number != position:
                err(seg, "HL01", f"is {number}, expected {position} (HL01 counts 1, 2, 3, ... in order)")
        level = seg[3]
        if level not in LEVEL_PARENTS:
            err(seg, "HL03", "is not a 278 level code (20, 21, 22, 23, EV, SS)")
        parent_text = seg[2]
        parent: int | None = None
        if parent_text == "":
            if level in LEVEL_PARENTS and None not in LEVEL_PARENTS[level]:
                err(seg, "HL02", f"level {level} ({LEVEL_NAMES[level]}) needs a parent HL")
            open_path = []
        elif not is_digits(parent_text):
            err(seg, "HL02", "is not a number")
        else:
            parent = int(parent_text)
            if number is not None and parent >= number:
                err(seg, "HL02", f"parent {parent} is not an earlier HL (it points forward or at itself)")
            elif parent not in levels:
                err(seg, "HL02", f"parent {parent} is not an HL of this transaction set")
            elif parent not in open_path:
                err(seg, "HL02", f"parent {parent} is closed: a later HL outside its subtree came between")
            else:
                children[parent] = children.get(parent, 0) + 1
                del open_path[open_path.index(parent) + 1:]
                if level == "20":
                    err(seg, "HL02", "level 20 (utilization management organization) is the root: no parent")
                elif level in LEVEL_PARENTS and levels[parent] not in LEVEL_PARENTS[level]:
                    wanted = " or ".join(str(p) for p in LEVEL_PARENTS[level])
                    err(seg, "HL03", f"level {level} cannot sit under level {levels[parent] or '?'} "
                                     f"(HL {parent}): its parent must be level {wanted}")  # fmt: skip
        if seg[4] not in ("0", "1") and len(seg) >= 4:
            err(seg, "HL04", "is not 0 (no children) or 1 (children follow)")
        if number is not None and number not in levels:
            levels[number] = level
            hl_segments[number] = seg
            contents[number] = set()
            open_path.append(number)
            current = number
        else:
            current = None

    for number, seg in hl_segments.items():
        has = children.get(number, 0)
        if seg[4] == "1" and not has:
            err(seg, "HL04", "says children follow, but no HL has this one as its parent")
        elif seg[4] == "0" and has:
            err(seg, "HL04", f"says no children follow, but {has} HL name this one as their parent")

    required = REQUEST_LEVELS if purpose == "request" else RESPONSE_LEVELS
    present = set(levels.values())
    for level in required:
        if level not in present:
            what = "a 278 request" if purpose == "request" else "a 278"
            err(st, "HL", f"no HL of level {level} ({LEVEL_NAMES[level]}): {what} needs one")
    if purpose == "request":
        needs = {"20": ("NM1",), "21": ("NM1",), "22": ("NM1",), "EV": ("TRN", "UM"), "SS": ("UM",)}
        for number, level in levels.items():
            for sid in needs.get(level, ()):
                if sid not in contents[number]:
                    err(hl_segments[number], None, f"level {level} ({LEVEL_NAMES[level]}) has no {sid} segment")
    return errors
