"""The character data's rules, in one place.

Audits, validation, the API and the database constraints' tests all read this module, so a
check can never drift from the model (the seed system's integrity tool did drift). Change a
rule here and the convention test tells you which migration must follow.
"""

from __future__ import annotations

from dataclasses import dataclass

ATTRIBUTES: tuple[str, ...] = (
    "strength", "dexterity", "stamina", "perception", "intelligence", "wits",
    "charisma", "manipulation", "appearance",
)
ABILITIES: tuple[str, ...] = (
    "alertness", "athletics", "brawl", "empathy", "expression", "intimidation", "streetwise",
    "subterfuge", "crafts", "drive", "etiquette", "firearms", "melee", "stealth", "academics",
    "computer", "investigation", "medicine", "science",
)


@dataclass(frozen=True)
class Range:
    """An inclusive integer range with the default a new character gets."""

    low: int
    high: int
    default: int | None

    def contains(self, value: int | None) -> bool:
        """True when value is inside (None never is; nullable traits check None first)."""
        return value is not None and self.low <= value <= self.high

    def clamp(self, value: int) -> int:
        """The nearest value inside the range."""
        return max(self.low, min(self.high, value))


ATTRIBUTE_RANGE = Range(1, 10, 1)
ABILITY_RANGE = Range(0, 10, 0)
WILLPOWER_RANGE = Range(1, 10, 3)
TEMPORARY_WILLPOWER_RANGE = Range(0, 10, 3)
AGE_RANGE = Range(0, 500, None)  # NULL = unknown
APPARENT_AGE_RANGE = Range(0, 200, None)

TRAIT_RANGES: dict[str, Range] = {
    **{name: ATTRIBUTE_RANGE for name in ATTRIBUTES},
    **{name: ABILITY_RANGE for name in ABILITIES},
    "willpower": WILLPOWER_RANGE,
    "temporary_willpower": TEMPORARY_WILLPOWER_RANGE,
}
NULLABLE_RANGES: dict[str, Range] = {"age": AGE_RANGE, "apparent_age": APPARENT_AGE_RANGE}

# Status codes and the only allowed transitions.
STATUS_NAMES: dict[str, str] = {
    "Un": "unfinished",
    "Sub": "submitted",
    "App": "approved",
    "Ret": "retired",
    "Dec": "deceased",
}
STATUSES: tuple[str, ...] = tuple(STATUS_NAMES)
DEFAULT_STATUS = "Un"
TRANSITIONS: dict[str, frozenset[str]] = {
    "Un": frozenset({"Sub", "Ret"}),
    "Sub": frozenset({"Un", "App", "Ret"}),
    "App": frozenset({"Ret", "Dec"}),
    "Ret": frozenset({"App"}),
    "Dec": frozenset(),
}

SPEND_STATES: tuple[str, ...] = ("Pending", "Approved", "Denied")
TRAIT_TYPES: tuple[str, ...] = ("attribute", "ability", "willpower", "other")
WEEKLY_CATEGORIES: tuple[str, ...] = ("finishing", "learning", "rp", "focus", "standingout")
# Every claimed weekly category except finishing must name the scene it was earned in.
WEEKLY_NEEDS_SCENE: tuple[str, ...] = ("learning", "rp", "focus", "standingout")
XP_LEDGER_KINDS: tuple[str, ...] = ("award", "spend", "refund", "adjust")

# Health report scoring (DOMAIN.md "Health report").
HEALTH_FINDING_PENALTY = 5
HEALTH_FINDING_PENALTY_CAP = 50
HEALTH_LOW_APPROVAL_RATE = 0.80
HEALTH_LOW_APPROVAL_PENALTY = 10
HEALTH_SCENES_AWAITING_LIMIT = 10
HEALTH_SCENES_AWAITING_PENALTY = 10
HEALTH_HEALTHY_AT = 90


def can_transition(current: str, new: str) -> bool:
    """Whether a character may move from status `current` to `new`."""
    return new in TRANSITIONS.get(current, frozenset())


def trait_range(name: str) -> Range:
    """The range of a trait by column name; KeyError for unknown traits."""
    return TRAIT_RANGES[name] if name in TRAIT_RANGES else NULLABLE_RANGES[name]


def check_sql() -> dict[str, str]:
    """The CHECK constraint expressions these rules imply, keyed by constraint name.

    The migration writes them literally (migrations are frozen history); a convention test
    compares the live database's constraints with this, so the two cannot drift.
    """
    checks: dict[str, str] = {
        "xp_nonnegative": "xp >= 0",
        "status_known": "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
    }
    for name, rng in TRAIT_RANGES.items():
        checks[f"{name}_range"] = f"{name} BETWEEN {rng.low} AND {rng.high}"
    checks["temporary_willpower_le_willpower"] = "temporary_willpower <= willpower"
    for name, rng in NULLABLE_RANGES.items():
        checks[f"{name}_range"] = f"{name} IS NULL OR {name} BETWEEN {rng.low} AND {rng.high}"
    return checks
