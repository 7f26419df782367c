"""The v2 long-term memory delay m, drawn once per training step (spec section 3)."""

from __future__ import annotations

import random


def sample_long_term_delay(seed: int, step: int, low: int, high: int) -> int:
    """m ~ Uniform{low, ..., high}, a pure function of (seed, step).

    Every rank (TP/PP/CP/DP) and every layer calls this with the same arguments and gets the same
    m without communication. ``random.Random`` seeded with a string hashes it with SHA-512, so the
    value does not depend on the process, PYTHONHASHSEED or the torch RNG state.
    """
    for name, value in (("seed", seed), ("step", step), ("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"sample_long_term_delay: {name} must be an int, got {value!r}")
    if step < 0:
        raise ValueError(f"sample_long_term_delay: step must be >= 0, got {step}")
    if not 1 <= low <= high:
        raise ValueError(f"sample_long_term_delay: need 1 <= low <= high, got low={low}, high={high}")
    return random.Random(f"mosaic-long-term-delay:{seed}:{step}").randint(low, high)
