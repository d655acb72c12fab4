"""Ids of productions, segments, takes and jobs: a kind prefix and 64 random bits, never caller input.

Owns: making ids and checking the ids callers send before they reach a query.
"""

from __future__ import annotations

import re
import secrets

from core.errors import InputError

ID_PATTERN = re.compile(r"^[a-z]{2,5}-[0-9a-f]{16}$")


def new_id(prefix: str) -> str:
    """e.g. ``prod-3f2a9c01d2e4a7b1``."""
    return f"{prefix}-{secrets.token_hex(8)}"


def check_id(value: str, what: str) -> str:
    """``value`` when it looks like an id this module made.

    Raises:
        InputError: anything else (the message names ``what``).
    """
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise InputError(f"{what} {str(value)[:40]!r} is not a valid id")
    return value
