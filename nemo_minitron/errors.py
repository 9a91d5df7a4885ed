"""The one error type users see: bad input, reported before any work starts."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input. The CLI prints it as one line and exits with status 2.

    Messages name the flag (or recipe key) and the allowed values, e.g.
    ``--tp 4 does not divide --num-query-groups 3 (allowed: 1, 3)``.
    """


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UsageError(message)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
