"""Checks for the identifiers a payer rejects a request over: NPI and TIN."""

from __future__ import annotations

import re

_NPI = re.compile(r"^\d{10}$")
_TIN = re.compile(r"^\d{2}-?\d{7}$")


def npi_is_valid(npi: str) -> bool:
    """An NPI is 10 digits whose last is a Luhn check digit over '80840' + the first nine (CMS)."""
    if not _NPI.match(npi):
        return False
    digits = [int(c) for c in "80840" + npi[:9]]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 0:  # every second digit from the right of the payload is doubled
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return (10 - total % 10) % 10 == int(npi[9])


def tin_is_valid(tin: str) -> bool:
    """A federal tax id: nine digits, written with or without the dash after the second."""
    return bool(_TIN.match(tin))
