"""Numbers as people read them: short, but never two different numbers alike.

A refusal that prints "rho 1 is above the cap of 1" contradicts itself: `:g` keeps six
significant digits, so an asked 1.0000001 and a cap of 1 print the same. Every budget message
(node refusals, the verifier's, a policy change) and every "must be between" of a query's
numbers formats its numbers together with `show_apart`, which uses the fewest digits (six at
least, as `:g` did) at which the numbers that differ also print differently, and `show` for a
number on its own.
"""

from __future__ import annotations

import math

# Six digits as `:g` has always printed; seventeen always tell two doubles apart.
_FEWEST_DIGITS = 6
_MOST_DIGITS = 17


def _digits(value: float) -> int:
    """How many significant digits the shortest text that reads back as value has."""
    mantissa = repr(abs(value)).split("e")[0]
    whole, _, fraction = mantissa.partition(".")
    # Zeros ending the whole part are significant for `g` (10 is "10", not "1e+01"); those
    # ending the fraction are not ("10.0" is two digits).
    fraction = fraction.rstrip("0")
    return max(1, len((whole + fraction if fraction else whole).lstrip("0")))


def _text(value: float, digits: int) -> str:
    if not math.isfinite(value):
        return f"{value:g}"
    # Never more digits than the shortest exact text has: a subnormal such as 1e-320 carries
    # few bits, so rounding it to six digits prints "9.99989e-321" for what was typed 1e-320.
    return f"{value:.{min(digits, _digits(value))}g}"


def show(value: float) -> str:
    """One budget number as short as `:g` prints it, and a subnormal as it was typed."""
    return _text(value, _FEWEST_DIGITS)


def show_apart(*values: float) -> tuple[str, ...]:
    """Texts for values that print alike only where the values are equal.

    The fewest digits (at least six) at which every pair of different values prints
    differently, so a refusal's asked rho and the limit it broke never read the same.
    """
    for digits in range(_FEWEST_DIGITS, _MOST_DIGITS + 1):
        texts = tuple(_text(v, digits) for v in values)
        # Equal values print alike, so as many texts as values means none collide.
        if len(set(texts)) >= len(set(values)):
            return texts
    return tuple(repr(v) for v in values)  # not reached: 17 digits tell doubles apart
