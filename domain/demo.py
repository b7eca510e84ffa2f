"""Demo and benchmark data (placeholder until the generator lands)."""

from __future__ import annotations


def seed(characters: int, *, violations: float = 0.05, rng_seed: int = 42) -> dict[str, int]:
    """Generate data; returns row counts per table."""
    raise NotImplementedError


def seed_demo_if_empty() -> dict[str, int] | None:
    """Load a small demo set when there are no characters yet."""
    return None
