"""The deadline engine: when a retro request (or an admission notice) is due, in the payer's time zone.

Plain values in (an aware anchor instant, a length, a ``WindowUnit``, an IANA zone name), a
``Deadline`` out, so the payer-rule library and the daily sweep call the same arithmetic.

Semantics, one line per unit (all reckoned in the payer's zone, never the server's):

* ``hours``: exact elapsed time. 24 hours across the spring-forward night ends one wall-clock hour
  later (25 h of clock face), because payers mean a duration, not a clock reading.
* ``calendar_days``: the anchor's local date + N days, due at the cut-off local time (default: end of
  that day, 23:59:59.999999). Wall-clock time is kept across DST. A weekend or holiday due date is NOT
  moved unless ``roll_to_business_day=True``: most payers count calendar days strictly.
* ``business_days``: the N-th business day strictly after the anchor's local date (a Saturday anchor
  + 1 = Monday), skipping weekends, US federal holidays (observed dates) and payer closures; due at the
  cut-off. 0 business days = the anchor's date if it is a business day, else the next one.

Every ``Deadline.due_at`` is a pendulum ``DateTime`` in the payer's zone, for display. Store, sort and
compare ``Deadline.due_utc`` instead: Python compares two datetimes that share a tzinfo by wall clock
(01:30 EDT == 01:30 EST in the repeated fall-back hour), and never finds a time in that hour equal to
one in another zone, even at the same instant.

A payer that takes no retro requests yields ``NotAccepted`` (see ``no_retro``), not ``None``: ``None``
would read as "no deadline", the opposite of "never in time".
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pendulum

from retroauth.vocab import Anchor, WindowUnit

END_OF_DAY = time(23, 59, 59, 999999)


@dataclass(frozen=True)
class Deadline:
    """A due instant and how it was reached (for the worklist and the audit trail)."""

    due_at: pendulum.DateTime  # aware, in the payer's time zone
    rule: str  # e.g. "retro window 90 calendar_days from service_date, due end of day America/Detroit"
    anchor_at: pendulum.DateTime  # the anchor, converted to the payer's time zone

    @property
    def due_utc(self) -> pendulum.DateTime:
        """The due instant in UTC: what to store, sort and compare (see the module doc)."""
        return self.due_at.in_timezone("UTC")


@dataclass(frozen=True)
class NotAccepted:
    """The payer accepts no retro request for this rule: the case is not eligible, whatever the date."""

    rule: str


# What a payer rule evaluates to: a deadline, or "never in time".
WindowResult = Deadline | NotAccepted


def no_retro(rule: str = "no retro requests accepted") -> NotAccepted:
    """The result for a payer that accepts no retro requests (e.g. Medicare OPD PA, MA at Priority Health)."""
    return NotAccepted(rule=rule)


# ---------------------------------------------------------------------------------------------------
# Business calendar


@functools.lru_cache(maxsize=256)
def _federal_holidays(year: int) -> frozenset[date]:
    # The holidays package files an observed day under the year it falls in (New Year 2028, a
    # Saturday, is observed Friday 2027-12-31 and listed in 2027), so one set per year is complete.
    return frozenset(holidays.US(years=year, categories=(holidays.PUBLIC,), observed=True))


def _as_date(d: date) -> date:
    # A datetime would silently compare unequal to every holiday date, and its zone is ambiguous.
    if isinstance(d, datetime):
        raise TypeError(f"expected a local date, got a datetime: {d!r} (take .date() in the payer's zone)")
    return date(d.year, d.month, d.day)  # plain date: pendulum.Date and friends hash alike


class BusinessCalendar:
    """Monday to Friday, minus US federal holidays (observed dates included) and payer closure dates."""

    def __init__(self, closures: Iterable[date] = ()) -> None:
        self.closures: frozenset[date] = frozenset(_as_date(d) for d in closures)

    def __repr__(self) -> str:
        return f"BusinessCalendar(closures={sorted(self.closures)!r})"

    def is_holiday(self, d: date) -> bool:
        """A US federal holiday or its observed day (payer closures are not holidays, just closed)."""
        d = _as_date(d)
        return d in _federal_holidays(d.year)

    def is_business_day(self, d: date) -> bool:
        d = _as_date(d)
        return d.weekday() < 5 and d not in _federal_holidays(d.year) and d not in self.closures

    def next_business_day(self, d: date) -> date:
        """The first business day strictly after ``d``."""
        d = _as_date(d) + timedelta(days=1)
        while not self.is_business_day(d):
            d += timedelta(days=1)
        return d

    def roll_forward(self, d: date) -> date:
        """``d`` if it is a business day, else the next one."""
        d = _as_date(d)
        return d if self.is_business_day(d) else self.next_business_day(d)

    def add_business_days(self, d: date, n: int) -> date:
        """The n-th business day after ``d`` (``d`` itself not counted); n = 0 rolls ``d`` forward."""
        if n < 0:
            raise ValueError(f"business days must be >= 0, got {n}")
        if n == 0:
            return self.roll_forward(d)
        for _ in range(n):
            d = self.next_business_day(d)
        return d


FEDERAL_CALENDAR = BusinessCalendar()


# ---------------------------------------------------------------------------------------------------
# Windows


@functools.lru_cache(maxsize=64)
def _zone(tz: str) -> pendulum.Timezone:
    # Cached: pendulum re-reads the zone file on every call, which dominated a sweep's run time.
    try:
        return pendulum.timezone(tz)
    except Exception as exc:  # InvalidTimezone, or ValueError for malformed keys
        raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as 'America/New_York')") from exc


def _aware(anchor_at: datetime, zone: pendulum.Timezone) -> pendulum.DateTime:
    # A naive anchor has no instant: guessing the server's zone would shift deadlines by hours.
    if not isinstance(anchor_at, datetime):
        raise TypeError(f"anchor_at must be a datetime, got {type(anchor_at).__name__}")
    if anchor_at.tzinfo is None or anchor_at.utcoffset() is None:
        raise ValueError(f"anchor_at must be timezone-aware, got naive {anchor_at!r}")
    return pendulum.instance(anchor_at.astimezone(UTC)).in_timezone(zone)


def _at_local(d: date, t: time, zone: pendulum.Timezone) -> pendulum.DateTime:
    # zoneinfo's fold=0 reading: a cut-off inside the spring-forward gap moves forward by the gap
    # (02:30 -> 03:30), an ambiguous one in the fall-back hour takes the first (earlier) instant.
    if t.tzinfo is not None:
        raise ValueError(f"cut-off {t!r} must be a naive local time (it is read in the payer's zone)")
    local = datetime.combine(d, t.replace(fold=0), tzinfo=ZoneInfo(zone.name))
    return pendulum.instance(local.astimezone(UTC)).in_timezone(zone)


def start_of_day(d: date, tz: str) -> pendulum.DateTime:
    """Midnight of ``d`` in payer zone ``tz``: the anchor for a date-only event such as a service date.

    Its local date in that zone is ``d``; midnight UTC, say, would be the previous day in every US zone.
    """
    zone = _zone(tz)
    return _at_local(_as_date(d), time(0), zone)


def _cutoff_text(t: time) -> str:
    if t == END_OF_DAY:
        return "end of day"
    return t.strftime("%H:%M") if not (t.second or t.microsecond) else t.isoformat()


def _label(rule: str, text: str) -> str:
    return f"{rule} {text}" if rule else text


def window_due(
    anchor_at: datetime,
    value: int,
    unit: WindowUnit | str,
    tz: str,
    *,
    cutoff: time | None = None,
    calendar: BusinessCalendar | None = None,
    roll_to_business_day: bool = False,
    anchor: Anchor | None = None,
    rule: str = "",
) -> Deadline:
    """The deadline ``value`` ``unit``s after ``anchor_at``, in payer zone ``tz`` (see the module doc).

    ``cutoff`` is the local due time for day windows (default end of day); ``calendar`` defaults to
    federal holidays only; ``anchor`` and ``rule`` only label the result.
    """
    unit = WindowUnit(unit)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"window length must be an int >= 0, got {value!r}")
    zone = _zone(tz)
    start = _aware(anchor_at, zone)
    cal = calendar if calendar is not None else FEDERAL_CALENDAR
    text = f"{value} {unit.value} from {anchor.value if anchor else 'anchor'}"

    if unit is WindowUnit.HOURS:
        # A cut-off or a roll would change the elapsed time the payer asked for; refuse rather than ignore.
        if cutoff is not None or roll_to_business_day:
            raise ValueError("cutoff / roll_to_business_day apply to day windows, not hours")
        # Added in UTC, where an hour is always an hour, then shown in the payer's zone.
        due = start.in_timezone("UTC").add(hours=value).in_timezone(zone)
        return Deadline(due, _label(rule, text) + " (exact elapsed time)", start)

    cut = cutoff or END_OF_DAY
    if unit is WindowUnit.CALENDAR_DAYS:
        due_date = start.date() + timedelta(days=value)
        if roll_to_business_day and not cal.is_business_day(due_date):
            rolled = cal.next_business_day(due_date)
            text += f", {due_date:%a %Y-%m-%d} not a business day: rolled to {rolled:%a %Y-%m-%d}"
            due_date = rolled
    else:
        due_date = cal.add_business_days(start.date(), value)
        text += " (skipping weekends, US federal holidays" + (", payer closures)" if cal.closures else ")")
    text += f", due {_cutoff_text(cut)} {zone.name}"
    return Deadline(_at_local(due_date, cut, zone), _label(rule, text), start)


def notification_due(
    anchor_at: datetime,
    value: int,
    unit: WindowUnit | str,
    tz: str,
    *,
    weekend_holiday_by: time | None,
    calendar: BusinessCalendar | None = None,
    anchor: Anchor | None = None,
    rule: str = "",
) -> Deadline:
    """An admission notice: "within 24 hours; weekend or holiday: by 5 pm on the next business day".

    The plain deadline is ``window_due(anchor_at, value, unit, tz)``. When ``weekend_holiday_by`` is set
    and the anchor's local date or the plain due date is not a business day, the due instant is the
    later of the plain deadline and ``weekend_holiday_by`` local time on the extension day:

    * the first business day after the plain due date, if that date is not a business day;
    * else (only the anchor's date is off) the first business day after the anchor's date.

    For windows of up to a day this is exactly "the next business day after the anchor's date" (Friday
    11 pm + 24 h = Saturday 11 pm -> Monday 17:00, Tuesday if Monday is a holiday); for longer windows
    (72 h from Thursday ending Sunday) it still lands on a business day instead of the weekend.
    The result is never earlier than the plain deadline.
    """
    cal = calendar if calendar is not None else FEDERAL_CALENDAR
    plain = window_due(anchor_at, value, unit, tz, calendar=cal, anchor=anchor, rule=rule)
    if weekend_holiday_by is None:
        return plain
    text = f"{plain.rule}; weekend/holiday: next business day {_cutoff_text(weekend_holiday_by)}"
    anchor_day, plain_day = plain.anchor_at.date(), plain.due_at.date()
    if cal.is_business_day(anchor_day) and cal.is_business_day(plain_day):
        return Deadline(plain.due_at, text, plain.anchor_at)
    ext_day = cal.next_business_day(plain_day if not cal.is_business_day(plain_day) else anchor_day)
    extended = _at_local(ext_day, weekend_holiday_by, _zone(tz))
    if extended.in_timezone("UTC") <= plain.due_utc:  # by instant, not wall clock
        return Deadline(plain.due_at, text, plain.anchor_at)
    return Deadline(extended, f"{text} (applied: {ext_day:%a %Y-%m-%d})", plain.anchor_at)


def due_after(start: datetime, value: int, unit: WindowUnit | str, tz: str,
              calendar: BusinessCalendar | None = None) -> datetime:
    """The UTC instant ``value`` ``unit``s after ``start`` on a payer's clock and calendar: when to ask the
    payer again, when its review SLA runs out, when an appeal is due (day windows end at local midnight)."""
    due = window_due(start, value, unit, tz, calendar=calendar).due_utc
    return datetime.fromtimestamp(due.timestamp(), UTC)
