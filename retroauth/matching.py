"""Is authorization required, and is there one? One set-based query over a window of encounters.

For each service line whose encounter started in the window, for each coverage of the patient in
effect on the date of service: the payer's "authorization required" rules by code system and code
(ranges compare equal-length codes), place of service or encounter class, effective dates, pairs
("only together with" a partner code on the same encounter); then no authorization on file for the
same payer and member (and provider, where the rule says so) whose codes and dates cover the line.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date

import sqlalchemy as sa

from retroauth.models import (
    Authorization, AuthorizationCode, Coverage, Encounter, PayerAuthPartner, PayerAuthRule, ServiceLine,
)
from retroauth.vocab import CodeSystem

# Statuses of an authorization on file that cover a service: granted, or asked for and pending.
COVERING_AUTH_STATUSES = ("approved", "pending")
_FAR_FUTURE = date(9999, 12, 31)


def _in_range(code: sa.ColumnElement, lo: sa.ColumnElement, hi: sa.ColumnElement, length: sa.ColumnElement):
    return sa.and_(sa.func.length(code) == length, code >= lo, code <= hi)


def code_family_sql(code_system: sa.ColumnElement) -> sa.ColumnElement:
    """SQL twin of ``rules.code_family``: CPT codes are HCPCS level I and match as HCPCS."""
    return sa.case((code_system == CodeSystem.CPT.value, CodeSystem.HCPCS.value), else_=code_system)


def uncovered_lines(encounter_ids: Sequence[int], payer_ids: Sequence[str] | None = None) -> sa.Select:
    """Rows (service_line_id, encounter_id, coverage_id, payer_id, member_id, category, rule_index)
    for the given encounters (the caller pages through the window).

    A line matched by several rules of one payer comes back once per rule; callers group by
    (encounter, payer).
    """
    sl, enc, cov, rule = ServiceLine, Encounter, Coverage, PayerAuthRule
    partner_line = sa.orm.aliased(ServiceLine)
    partner = PayerAuthPartner

    has_partner = sa.exists().where(
        partner.payer_id == rule.payer_id,
        partner.rule_index == rule.rule_index,
        partner_line.encounter_id == sl.encounter_id,
        code_family_sql(partner_line.code_system) == partner.code_system,
        _in_range(partner_line.code, partner.code_lo, partner.code_hi, partner.code_len),
    )
    authorized = (
        sa.exists()
        .where(
            Authorization.payer_id == cov.payer_id,
            Authorization.member_id == cov.member_id,
            Authorization.status.in_(COVERING_AUTH_STATUSES),
            Authorization.starts_on <= sl.service_date,
            Authorization.ends_on >= sl.service_date,
            AuthorizationCode.authorization_id == Authorization.id,
            code_family_sql(AuthorizationCode.code_system) == code_family_sql(sl.code_system),
            AuthorizationCode.code == sl.code,
            sa.or_(
                sa.not_(rule.provider_specific),
                Authorization.provider_npi.is_(None),
                Authorization.provider_npi == sl.rendering_npi,
            ),
        )
    )
    q = (
        sa.select(
            sl.id.label("service_line_id"), enc.id.label("encounter_id"), cov.id.label("coverage_id"),
            cov.payer_id, cov.member_id, rule.category, rule.rule_index,
        )
        .select_from(sl)
        .join(enc, enc.id == sl.encounter_id)
        .join(
            cov,
            sa.and_(
                cov.patient_id == enc.patient_id,
                cov.effective_from <= sl.service_date,
                sa.func.coalesce(cov.effective_to, _FAR_FUTURE) >= sl.service_date,
            ),
        )
        .join(
            rule,
            sa.and_(
                rule.payer_id == cov.payer_id,
                rule.code_system == code_family_sql(sl.code_system),
                _in_range(sl.code, rule.code_lo, rule.code_hi, rule.code_len),
                rule.effective_from <= sl.service_date,
                sa.func.coalesce(rule.effective_to, _FAR_FUTURE) >= sl.service_date,
                sa.or_(rule.place_of_service.is_(None), rule.place_of_service == enc.place_of_service),
                sa.or_(rule.encounter_class.is_(None), rule.encounter_class == enc.encounter_class),
            ),
        )
        .where(
            enc.id.in_(list(encounter_ids)),
            sa.or_(sa.not_(rule.requires_partner), has_partner),
            sa.not_(authorized),
        )
        .distinct()
    )
    if payer_ids is not None:
        q = q.where(cov.payer_id.in_(list(payer_ids)))
    return q
