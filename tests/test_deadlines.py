"""The deadline engine: table tests from the payer policies in domain.md, then properties (hypothesis)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import holidays
import pendulum
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retroauth.deadlines import (
    FEDERAL_CALENDAR,
    BusinessCalendar,
    Deadline,
    NotAccepted,
    WindowResult,
    no_retro,
    notification_due,
    start_of_day,
    window_due,
)
from retroauth.vocab import Anchor, WindowUnit

H, CD, BD = WindowUnit.HOURS, WindowUnit.CALENDAR_DAYS, WindowUnit.BUSINESS_DAYS
PT, ET, CT = "America/Los_Angeles", "America/New_York", "America/Chicago"
FIVE_PM = time(17)


def at(tz: str, *args: int) -> pendulum.DateTime:
    return pendulum.datetime(*args, tz=tz)


def local(d: Deadline) -> tuple[str, str]:
    """(weekday + local date-time, UTC offset): what a person reads on the worklist."""
    return d.due_at.format("ddd YYYY-MM-DD HH:mm"), d.due_at.format("Z")


# --- business calendar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("day", "holiday"),
    [
        (date(2026, 11, 26), True),  # Thanksgiving 2026
        (date(2026, 11, 27), False),  # the Friday after is not a federal holiday
        (date(2026, 7, 3), True),  # Independence Day (Saturday) observed Friday
        (date(2026, 12, 25), True),
        (date(2027, 12, 24), True),  # Christmas 2027 is a Saturday: observed Friday 12-24
        (date(2027, 12, 31), True),  # New Year 2028 is a Saturday: observed Friday 2027-12-31
        (date(2028, 1, 1), True),  # the Saturday itself is listed too (a weekend anyway)
        (date(2022, 12, 26), True),  # Christmas 2022 on a Sunday: observed Monday
        (date(2021, 6, 18), True),  # first Juneteenth, observed Friday
        (date(2027, 1, 18), True),  # MLK day
        (date(2026, 11, 11), True),  # Veterans Day, a Wednesday
    ],
)
def test_federal_holidays_observed(day: date, holiday: bool) -> None:
    assert FEDERAL_CALENDAR.is_holiday(day) is holiday
    if holiday:
        assert not FEDERAL_CALENDAR.is_business_day(day)


def test_calendar_basics_and_closures() -> None:
    closed = BusinessCalendar(closures=[date(2026, 11, 27), pendulum.date(2026, 12, 24)])
    assert FEDERAL_CALENDAR.is_business_day(date(2026, 11, 27))
    assert not closed.is_business_day(date(2026, 11, 27))
    assert not closed.is_business_day(date(2026, 12, 24))  # pendulum dates count like plain dates
    assert not FEDERAL_CALENDAR.is_business_day(date(2026, 11, 28))  # Saturday
    # next_business_day is strictly after; roll_forward keeps a business day.
    assert FEDERAL_CALENDAR.next_business_day(date(2026, 11, 25)) == date(2026, 11, 27)
    assert closed.next_business_day(date(2026, 11, 25)) == date(2026, 11, 30)
    assert FEDERAL_CALENDAR.roll_forward(date(2026, 11, 25)) == date(2026, 11, 25)
    assert FEDERAL_CALENDAR.roll_forward(date(2026, 11, 26)) == date(2026, 11, 27)
    # Counting across Thanksgiving week.
    assert FEDERAL_CALENDAR.add_business_days(date(2026, 11, 25), 1) == date(2026, 11, 27)
    assert FEDERAL_CALENDAR.add_business_days(date(2026, 11, 24), 3) == date(2026, 11, 30)
    assert closed.add_business_days(date(2026, 11, 24), 3) == date(2026, 12, 1)
    # A Saturday + 1 business day is the Monday; + 0 rolls forward to it.
    assert FEDERAL_CALENDAR.add_business_days(date(2026, 11, 21), 1) == date(2026, 11, 23)
    assert FEDERAL_CALENDAR.add_business_days(date(2026, 11, 21), 0) == date(2026, 11, 23)
    # Christmas and New Year 2027/28, both observed on Fridays.
    assert FEDERAL_CALENDAR.add_business_days(date(2027, 12, 23), 1) == date(2027, 12, 27)
    assert FEDERAL_CALENDAR.add_business_days(date(2027, 12, 23), 5) == date(2028, 1, 3)
    with pytest.raises(TypeError, match="datetime"):
        FEDERAL_CALENDAR.is_business_day(datetime(2026, 11, 26, 12))
    with pytest.raises(ValueError):
        FEDERAL_CALENDAR.add_business_days(date(2026, 11, 26), -1)


# --- retro windows ----------------------------------------------------------------------------------


WINDOWS = [
    # Priority Health: 90 days from service; across the March DST change the wall clock is kept.
    ("90 days", start_of_day(date(2026, 1, 15), "America/Detroit"), 90, CD, "America/Detroit", {},
     ("Wed 2026-04-15 23:59", "-04:00")),
    # EmblemHealth: 45 days from the remittance.
    ("45 days remit", at(ET, 2026, 10, 20, 9), 45, CD, ET, {}, ("Fri 2026-12-04 23:59", "-05:00")),
    # HPSJ: 30 calendar days, landing on a Saturday: not moved...
    ("30 days sat", at(PT, 2026, 10, 1, 8), 30, CD, PT, {}, ("Sat 2026-10-31 23:59", "-07:00")),
    # ...unless the payer rolls to the next business day.
    ("30 days rolled", at(PT, 2026, 10, 1, 8), 30, CD, PT, {"roll_to_business_day": True},
     ("Mon 2026-11-02 23:59", "-08:00")),
    # Rolling past Thanksgiving and a payer closure on the Friday after.
    ("roll thanksgiving", at(ET, 2026, 11, 19, 8), 7, CD, ET,
     {"roll_to_business_day": True, "calendar": BusinessCalendar([date(2026, 11, 27)])},
     ("Mon 2026-11-30 23:59", "-05:00")),
    # Medicare OPD: decision in 10 business days, across Thanksgiving 2026.
    ("10 bd thanksgiving", at(ET, 2026, 11, 16, 10), 10, BD, ET, {"cutoff": FIVE_PM},
     ("Tue 2026-12-01 17:00", "-05:00")),
    # 10 business days across Christmas 2026 and New Year 2027 (both Fridays).
    ("10 bd christmas", at(CT, 2026, 12, 18, 10), 10, BD, CT, {}, ("Tue 2027-01-05 23:59", "-06:00")),
    # The same with the payer closed on Christmas Eve.
    ("10 bd closure", at(CT, 2026, 12, 18, 10), 10, BD, CT,
     {"calendar": BusinessCalendar([date(2026, 12, 24)])}, ("Wed 2027-01-06 23:59", "-06:00")),
    # Expedited: 2 business days from the Wednesday before Thanksgiving.
    ("2 bd wed", at(ET, 2026, 11, 25, 21), 2, BD, ET, {"cutoff": FIVE_PM}, ("Mon 2026-11-30 17:00", "-05:00")),
    # CMS-0057-F: expedited 72 hours, standard 7 calendar days.
    ("72 h", at(ET, 2026, 11, 25, 21), 72, H, ET, {}, ("Sat 2026-11-28 21:00", "-05:00")),
    ("7 days", at(ET, 2026, 11, 25, 21), 7, CD, ET, {}, ("Wed 2026-12-02 23:59", "-05:00")),
    # Independence Blue Cross: 1 year (365 days) after service, across a DST change both ways.
    ("365 days", at(ET, 2026, 6, 1, 14), 365, CD, ET, {}, ("Tue 2027-06-01 23:59", "-04:00")),
]


def named(rows: list[tuple]) -> list:
    return [pytest.param(*row[1:], id=row[0]) for row in rows]


@pytest.mark.parametrize(("anchor_at", "value", "unit", "tz", "kwargs", "expected"), named(WINDOWS))
def test_window_table(anchor_at, value, unit, tz, kwargs, expected) -> None:
    d = window_due(anchor_at, value, unit, tz, **kwargs)
    assert local(d) == expected
    assert d.due_at.timezone_name == tz
    assert d.anchor_at == anchor_at


def test_default_cutoff_is_the_last_microsecond_of_the_day() -> None:
    d = window_due(at(ET, 2026, 10, 20, 9), 45, CD, ET)
    assert (d.due_at.hour, d.due_at.minute, d.due_at.second, d.due_at.microsecond) == (23, 59, 59, 999999)
    assert d.due_at.add(microseconds=1) == at(ET, 2026, 12, 5)


def test_anchor_local_date_is_taken_in_the_payer_zone() -> None:
    # 06:00 UTC on Nov 21 is Nov 20 in Los Angeles, Nov 21 in New York: the payer's day counts.
    anchor = datetime(2026, 11, 21, 6, tzinfo=UTC)
    assert local(window_due(anchor, 1, CD, PT))[0] == "Sat 2026-11-21 23:59"
    assert local(window_due(anchor, 1, CD, ET))[0] == "Sun 2026-11-22 23:59"
    # A date-only service date: start_of_day keeps its date in the payer zone.
    assert start_of_day(date(2026, 11, 20), PT).date() == date(2026, 11, 20)


def test_rule_text_says_what_was_applied() -> None:
    d = window_due(start_of_day(date(2026, 1, 15), "America/Detroit"), 90, CD, "America/Detroit",
                   anchor=Anchor.SERVICE_DATE, rule="retro window")
    assert d.rule == "retro window 90 calendar_days from service_date, due end of day America/Detroit"
    rolled = window_due(at(PT, 2026, 10, 1, 8), 30, "calendar_days", PT, roll_to_business_day=True)
    assert "Sat 2026-10-31 not a business day: rolled to Mon 2026-11-02" in rolled.rule
    bd = window_due(at(ET, 2026, 11, 16), 10, BD, ET, cutoff=FIVE_PM, calendar=BusinessCalendar([date(2026, 12, 24)]))
    assert bd.rule.endswith("(skipping weekends, US federal holidays, payer closures), due 17:00 America/New_York")


# --- DST weeks: hours keep elapsed time, days keep the wall clock ----------------------------------


@pytest.mark.parametrize("tz", [ET, CT])
def test_spring_forward_2026(tz: str) -> None:
    anchor = at(tz, 2026, 3, 7, 12)  # Saturday noon, standard time; clocks jump at 02:00 Sunday
    hours = window_due(anchor, 24, H, tz)
    assert hours.due_at.format("YYYY-MM-DD HH:mm") == "2026-03-08 13:00"  # 24 h elapsed = 13:00 daylight
    assert (hours.due_at - anchor).total_seconds() == 24 * 3600
    day = window_due(anchor, 1, CD, tz, cutoff=time(12))
    assert day.due_at.format("YYYY-MM-DD HH:mm") == "2026-03-08 12:00"  # same wall clock...
    assert (day.due_at - anchor).total_seconds() == 23 * 3600  # ...23 h later
    # A cut-off inside the skipped hour moves forward by the gap.
    gap = window_due(anchor, 1, CD, tz, cutoff=time(2, 30))
    assert gap.due_at.format("HH:mm") == "03:30"


@pytest.mark.parametrize("tz", [ET, CT])
def test_fall_back_2026(tz: str) -> None:
    anchor = at(tz, 2026, 10, 31, 12)  # Saturday noon, daylight time; clocks go back at 02:00 Sunday
    hours = window_due(anchor, 24, H, tz)
    assert hours.due_at.format("YYYY-MM-DD HH:mm") == "2026-11-01 11:00"
    assert (hours.due_at - anchor).total_seconds() == 24 * 3600
    day = window_due(anchor, 1, CD, tz, cutoff=time(12))
    assert day.due_at.format("YYYY-MM-DD HH:mm") == "2026-11-01 12:00"
    assert (day.due_at - anchor).total_seconds() == 25 * 3600
    # A cut-off in the repeated hour takes its first occurrence (daylight time).
    twice = window_due(anchor, 1, CD, tz, cutoff=time(1, 30))
    assert twice.due_at.utcoffset() == at(tz, 2026, 10, 31).utcoffset()
    # An anchor in the second 01:30 (standard time), + 1 hour, is 02:30 standard.
    second = datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo(tz))
    due = window_due(second, 1, H, tz).due_at
    assert due.format("HH:mm") == "02:30"
    assert due.utcoffset() == second.utcoffset() == at(tz, 2026, 11, 2).utcoffset()


def test_repeated_hour_compare_by_due_utc() -> None:
    # 24 h and 25 h from Saturday 01:30 daylight time both read "01:30" on Sunday, an hour apart.
    anchor = at(ET, 2026, 10, 31, 1, 30)
    first, second = window_due(anchor, 24, H, ET), window_due(anchor, 25, H, ET)
    assert first.due_at.format("HH:mm Z") == "01:30 -04:00"
    assert second.due_at.format("HH:mm Z") == "01:30 -05:00"
    assert first.due_utc < second.due_utc
    assert (second.due_at - first.due_at).total_seconds() == 3600  # pendulum subtracts instants
    assert first.due_at == second.due_at  # Python's same-zone comparison: the trap due_utc avoids
    assert first.due_at != first.due_utc  # ...and the inter-zone one, in the repeated hour


# --- admission notification -------------------------------------------------------------------------


def notice(anchor_at, value=24, tz=PT, by=FIVE_PM, calendar=None) -> Deadline:
    return notification_due(anchor_at, value, H, tz, weekend_holiday_by=by, calendar=calendar,
                            anchor=Anchor.ADMISSION, rule="notification")


NOTICES = [
    # domain.md: Friday 11 pm emergency admission, "24 h, weekend: 5 pm Pacific next business day".
    ("fri 11pm", at(PT, 2026, 11, 20, 23), {}, "Mon 2026-11-23 17:00"),
    # The same when Monday is a holiday (MLK day 2027): Tuesday.
    ("fri before mlk", at(PT, 2027, 1, 15, 23), {}, "Tue 2027-01-19 17:00"),
    # ...or a payer closure.
    ("fri before closure", at(PT, 2026, 11, 20, 23), {"calendar": BusinessCalendar([date(2026, 11, 23)])},
     "Tue 2026-11-24 17:00"),
    # A weekday admission whose 24 h ends on a weekday: plain 24 h.
    ("tue 10am", at(PT, 2026, 11, 17, 10), {}, "Wed 2026-11-18 10:00"),
    # Friday morning: 24 h ends Saturday morning, a weekend -> Monday 5 pm.
    ("fri 9am", at(PT, 2026, 11, 20, 9), {}, "Mon 2026-11-23 17:00"),
    # Saturday admission -> Monday 5 pm.
    ("sat 10am", at(PT, 2026, 11, 21, 10), {}, "Mon 2026-11-23 17:00"),
    # Sunday 11 pm: the plain 24 h (Monday 11 pm) is later than Monday 5 pm, so it stands.
    ("sun 11pm", at(PT, 2026, 11, 22, 23), {}, "Mon 2026-11-23 23:00"),
    # Thanksgiving week: a Wednesday-night admission; 24 h ends on the holiday -> Friday 5 pm.
    ("wed before thanksgiving", at(ET, 2026, 11, 25, 22), {"tz": ET}, "Fri 2026-11-27 17:00"),
    # ...and Monday if the payer also closes the Friday after Thanksgiving.
    ("wed, closed fri", at(ET, 2026, 11, 25, 22),
     {"tz": ET, "calendar": BusinessCalendar([date(2026, 11, 27)])}, "Mon 2026-11-30 17:00"),
    # Thursday before the observed Independence Day (Friday 2026-07-03) -> Monday.
    ("thu before july 4", at(CT, 2026, 7, 2, 9), {"tz": CT}, "Mon 2026-07-06 17:00"),
    # Christmas Eve 2027 (observed Christmas, Friday) after a Thursday-night admission -> Monday.
    ("thu before xmas 2027", at(ET, 2027, 12, 23, 20), {"tz": ET}, "Mon 2027-12-27 17:00"),
    # 72 h from Thursday 11 pm ends Sunday 11 pm: the extension still lands on a business day.
    ("72h thu", at(PT, 2026, 11, 19, 23), {"value": 72}, "Mon 2026-11-23 17:00"),
    # No weekend rule: plain 24 h, Saturday 11 pm.
    ("no weekend rule", at(PT, 2026, 11, 20, 23), {"by": None}, "Sat 2026-11-21 23:00"),
]


@pytest.mark.parametrize(("anchor_at", "kwargs", "expected"), named(NOTICES))
def test_notification_table(anchor_at, kwargs, expected) -> None:
    d = notice(anchor_at, **kwargs)
    assert local(d)[0] == expected


def test_notification_rule_text() -> None:
    d = notice(at(PT, 2026, 11, 20, 23))
    assert d.rule == ("notification 24 hours from admission (exact elapsed time); "
                      "weekend/holiday: next business day 17:00 (applied: Mon 2026-11-23)")
    assert not notice(at(PT, 2026, 11, 17, 10)).rule.endswith(")")


# --- no retro, bad input ----------------------------------------------------------------------------


def test_payer_accepting_no_retro() -> None:
    result: WindowResult = no_retro("Medicare OPD PA: no retro, a request after the service is non-affirmed")
    assert isinstance(result, NotAccepted)
    assert "no retro" in result.rule
    match result:  # callers branch on the type: NotAccepted is not "no deadline"
        case Deadline():
            pytest.fail("a payer without retro has no deadline to meet")
        case NotAccepted(rule=rule):
            assert rule.startswith("Medicare")
    assert no_retro() == NotAccepted("no retro requests accepted")


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        window_due(datetime(2026, 11, 20, 23), 24, H, PT)
    with pytest.raises(ValueError, match="timezone-aware"):
        notification_due(datetime(2026, 11, 20, 23), 24, H, PT, weekend_holiday_by=FIVE_PM, calendar=None)
    with pytest.raises(ValueError, match="unknown time zone"):
        window_due(at(PT, 2026, 11, 20), 1, CD, "Pacific Time")
    with pytest.raises(ValueError, match="unknown time zone"):
        window_due(at(PT, 2026, 11, 20), 1, CD, "")
    with pytest.raises(ValueError):
        window_due(at(PT, 2026, 11, 20), 1, "weeks", PT)
    with pytest.raises(ValueError, match=">= 0"):
        window_due(at(PT, 2026, 11, 20), -1, CD, PT)
    with pytest.raises(ValueError, match="day windows"):
        window_due(at(PT, 2026, 11, 20), 24, H, PT, cutoff=FIVE_PM)
    with pytest.raises(ValueError, match="naive local time"):
        window_due(at(PT, 2026, 11, 20), 1, CD, PT, cutoff=time(17, tzinfo=UTC))


# --- properties -------------------------------------------------------------------------------------

ZONES = [ET, CT, "America/Denver", "America/Phoenix", PT, "America/Anchorage", "Pacific/Honolulu"]
PROPS = settings(max_examples=200, deadline=None)



def _dst_sundays() -> list[datetime]:
    """Midnight UTC of each US DST change day 2020-2030 (2nd Sunday of March, 1st Sunday of November)."""
    days = []
    for year in range(2020, 2031):
        for month, nth in ((3, 2), (11, 1)):
            first = date(year, month, 1)
            sunday = first + timedelta(days=(6 - first.weekday()) % 7 + 7 * (nth - 1))
            days.append(datetime.combine(sunday, time(0), tzinfo=UTC))
    return days


# Anchors are built from instants rather than st.datetimes(timezones=...): hypothesis probes every
# zone's transitions for that, about a second per test. Roughly half the anchors fall within 3 days of a
# US DST change instead, so the transitions are still well covered.
_LO, _HI = datetime(2020, 1, 1, tzinfo=UTC), datetime(2030, 12, 31, 23, 59, 59, tzinfo=UTC)
_SPAN_US = int((_HI - _LO).total_seconds()) * 10**6
instants = st.one_of(
    st.integers(0, _SPAN_US).map(lambda us: _LO + timedelta(microseconds=us)),
    st.builds(lambda day, us: day + timedelta(microseconds=us),
              st.sampled_from(_dst_sundays()), st.integers(-3 * 86400 * 10**6, 3 * 86400 * 10**6)),
)
# The anchor arrives in some zone (not always the payer's); the engine must read it by instant.
anchors = st.builds(lambda t, z: t.astimezone(z), instants, st.sampled_from([ZoneInfo(z) for z in ZONES] + [UTC]))
zones = st.sampled_from(ZONES)
cutoffs = st.none() | st.times().map(lambda t: t.replace(microsecond=0))
# Federal holidays only, or a payer that also closes the Friday after Thanksgiving and Christmas Eve.
_THANKSGIVING = [d for y in range(2020, 2034) for d, name in holidays.US(years=y).items() if "Thanksgiving" in name]
calendars = st.sampled_from([
    FEDERAL_CALENDAR,
    BusinessCalendar([d + timedelta(days=1) for d in _THANKSGIVING] + [date(y, 12, 24) for y in range(2020, 2034)]),
])
day_units = st.sampled_from([CD, BD])


def local_date(instant: datetime, tz: str) -> date:
    return instant.astimezone(ZoneInfo(tz)).date()  # stdlib, independent of the engine


@PROPS
@given(anchors, zones, st.integers(0, 400), day_units, calendars)
def test_due_is_never_before_the_anchor(anchor, tz, n, unit, cal) -> None:
    start = anchor.astimezone(UTC)
    assert window_due(anchor, n, unit, tz, calendar=cal).due_utc >= start
    # With a cut-off, a 0-day window can already be over (same day by 5 pm, anchored at 6 pm).
    assert window_due(anchor, n + 1, unit, tz, cutoff=FIVE_PM, calendar=cal).due_utc >= start


@PROPS
@given(anchors, zones, st.integers(0, 2000))
def test_hours_are_exact_elapsed_time(anchor, tz, n) -> None:
    d = window_due(anchor, n, H, tz)
    assert d.due_utc == anchor.astimezone(UTC) + timedelta(hours=n)
    assert (d.due_at - d.anchor_at).total_seconds() == n * 3600
    assert d.due_at.timezone_name == tz


@PROPS
@given(anchors, zones, st.integers(0, 400), cutoffs, calendars)
def test_business_days_land_on_business_days(anchor, tz, n, cutoff, cal) -> None:
    d = window_due(anchor, n, BD, tz, cutoff=cutoff, calendar=cal)
    due_day = local_date(d.due_at, tz)
    assert cal.is_business_day(due_day)
    assert due_day >= local_date(anchor, tz)
    # Exactly n business days after the anchor's date (n >= 1), counted the slow way.
    if n:
        start = local_date(anchor, tz)
        days = [start + timedelta(i) for i in range(1, (due_day - start).days + 1)]
        assert sum(map(cal.is_business_day, days)) == n


@PROPS
@given(anchors, zones, st.integers(0, 400), cutoffs)
def test_calendar_days_count_local_dates(anchor, tz, n, cutoff) -> None:
    d = window_due(anchor, n, CD, tz, cutoff=cutoff)
    assert (local_date(d.due_at, tz) - local_date(anchor, tz)).days == n
    if cutoff is None:
        assert d.due_at.time() == time(23, 59, 59, 999999)


@PROPS
@given(anchors, zones, st.integers(0, 400), st.integers(0, 400), st.sampled_from(list(WindowUnit)), calendars)
def test_more_time_never_gives_an_earlier_deadline(anchor, tz, n, k, unit, cal) -> None:
    kw = {"calendar": cal} if unit is not H else {}
    assert window_due(anchor, n, unit, tz, **kw).due_utc <= window_due(anchor, n + k, unit, tz, **kw).due_utc


@PROPS
@given(anchors, zones, st.sampled_from([24, 48, 72]), st.builds(time, st.integers(0, 23), st.sampled_from([0, 30])),
       calendars)
def test_notification_is_never_before_the_plain_deadline(anchor, tz, hours, by, cal) -> None:
    plain = window_due(anchor, hours, H, tz)
    d = notification_due(anchor, hours, H, tz, weekend_holiday_by=by, calendar=cal)
    assert d.due_utc >= plain.due_utc
    if d.due_utc != plain.due_utc:  # extended: to a business day, at the stated time
        assert cal.is_business_day(local_date(d.due_at, tz))
    if hours == 24:  # the definition in the brief: later of plain and next business day after the anchor
        start, end = local_date(anchor, tz), local_date(plain.due_at, tz)
        if cal.is_business_day(start) and cal.is_business_day(end):
            assert d.due_utc == plain.due_utc
        else:
            ext = datetime.combine(cal.next_business_day(start), by, tzinfo=ZoneInfo(tz)).astimezone(UTC)
            assert d.due_utc == max(plain.due_utc, ext)
