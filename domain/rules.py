"""The character data's rules, in one place.

Audits, validation, the API and the database constraints' tests all read this module, so a
check can never drift from the model (the seed system's integrity tool did drift). Change a
rule here and the convention test tells you which migration must follow.
"""

from __future__ import annotations

from collections.abc import Iterable
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
SPEND_PENDING, SPEND_APPROVED, SPEND_DENIED = SPEND_STATES  # the flows and SQL name them
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


# --- XP costs and awards (tasks/xp, the legacy spent_xp migration, the demo generator) ---
# The seed system's classic costs: raising a trait by one dot costs its current rating times
# the type's multiplier (attribute x4, ability x2, willpower x1, anything else x1); a new
# ability (0 -> 1) costs a flat 3. Expressed on the NEW value v: (v - 1) x multiplier.
XP_COST_MULTIPLIER: dict[str, int] = {"attribute": 4, "ability": 2, "willpower": 1, "other": 1}
XP_NEW_ABILITY_COST = 3
SCENE_AWARD_XP = 1  # per participant named true (DOMAIN.md "Scene award")
WEEKLY_XP_PER_CATEGORY = 1  # one XP per claimed category (DOMAIN.md "Weekly XP request")
# Traits a spend may raise: the trait columns of a character (other trait types have none).
SPENDABLE_TRAITS: tuple[str, ...] = (*ATTRIBUTES, *ABILITIES, "willpower")


def trait_type(trait_name: str) -> str:
    """The spend-request trait_type of a trait column: attribute, ability or willpower."""
    if trait_name in ATTRIBUTES:
        return "attribute"
    if trait_name in ABILITIES:
        return "ability"
    if trait_name == "willpower":
        return "willpower"
    return "other"


def xp_cost(kind: str, new_value: int) -> int:
    """XP cost of raising a trait of `kind` (a TRAIT_TYPES value) to `new_value` by one dot."""
    if kind not in XP_COST_MULTIPLIER:
        raise ValueError(f"unknown trait type {kind!r}")
    if kind == "ability" and new_value == 1:
        return XP_NEW_ABILITY_COST
    cost = (new_value - 1) * XP_COST_MULTIPLIER[kind]
    if cost <= 0:
        raise ValueError(f"a {kind} cannot be raised to {new_value}")
    return cost


# Spends buy one dot at a time, each paid at its own price (xp_cost) when it is asked for.
# Pending dots of one trait may stack (3, then 4 while 3 waits), but every dot a character
# holds must have been paid at its price exactly once (review N7: deny 3, approve 4 bought
# two dots for one price), so:
# - a spend asks for the dot above both the current value and the highest pending dot;
# - approving a dot needs the dot below it held (the trait is exactly trait_value - 1):
#   dots are approved in order, and a dot whose lower dot is not held is refused
#   (out_of_order) and left Pending, for the storyteller to deny (which refunds it);
# - denying a dot also denies every higher pending dot of the same trait and refunds each
#   (they were priced on top of the denied one, and can never be approved in order now).


def next_spend_value(current: int, highest_pending: int | None) -> int:
    """The only value a spend of a trait may ask for: one dot above what is held or asked."""
    return max(current, highest_pending or 0) + 1


def approvable(current: int, trait_value: int) -> bool:
    """Whether a pending dot may be approved: the dot below it is held, and it is not."""
    return current == trait_value - 1


def denied_with(trait_value: int, pending_values: Iterable[int]) -> list[int]:
    """The pending dots of a trait that a denial of `trait_value` denies too: every one above."""
    return sorted(v for v in pending_values if v > trait_value)


def value_for_cost(kind: str, cost: int) -> int | None:
    """The new value whose one-dot cost is `cost` (inverse of xp_cost), or None if none is.

    The newer legacy spent_xp shape records the cost but not the new value; this recovers it.
    """
    if kind not in XP_COST_MULTIPLIER or cost <= 0:
        return None
    if kind == "ability" and cost == XP_NEW_ABILITY_COST:
        return 1
    multiplier = XP_COST_MULTIPLIER[kind]
    if cost % multiplier:
        return None
    value = cost // multiplier + 1
    return value if xp_cost(kind, value) == cost else None


def xp_cost_sql(kind: str, value: str) -> str:
    """xp_cost as a SQL expression over the SQL expressions `kind` and `value` (set-based
    jobs and the demo generator compute costs in the database, from these same numbers)."""
    whens = " ".join(
        f"WHEN '{k}' THEN ({value} - 1) * {m}" for k, m in XP_COST_MULTIPLIER.items()
        if k != "ability"
    )
    ability = (f"WHEN 'ability' THEN CASE WHEN {value} = 1 THEN {XP_NEW_ABILITY_COST} "
               f"ELSE ({value} - 1) * {XP_COST_MULTIPLIER['ability']} END")
    return f"CASE {kind} {ability} {whens} END"


# --- Integrity checks, validation and the health report (tasks/audits, tasks/validation,
# tasks/reports). domain/checks.py turns these into SQL and Python; nothing restates them.
# DOMAIN.md "Integrity checks", in its order: the names the audit, its API and CLI use.
INTEGRITY_CHECKS: tuple[str, ...] = (
    "negative_xp", "unknown_status", "attribute_range", "ability_range", "willpower_range",
    "age_range", "duplicate_st_relationships", "scene_xp",
)
# The check each character rule of check_sql() belongs to (checks 1-6).
CHARACTER_RULE_CHECKS: dict[str, str] = {
    "xp_nonnegative": "negative_xp",
    "status_known": "unknown_status",
    **{f"{name}_range": "attribute_range" for name in ATTRIBUTES},
    **{f"{name}_range": "ability_range" for name in ABILITIES},
    "willpower_range": "willpower_range",
    "temporary_willpower_range": "willpower_range",
    "temporary_willpower_le_willpower": "willpower_range",
    "age_range": "age_range",
    "apparent_age_range": "age_range",
}
# The fixes. Check 1: negative XP is set to this floor ("xp >= 0").
XP_FLOOR = 0
# Check 2: an unknown status becomes DEFAULT_STATUS; no transition leads there from an
# unknown code, so the audit records it as a forced status change.
# Checks 3-5: a trait outside its TRAIT_RANGES entry is clamped to it; then a temporary
# value above its cap (the permanent trait, after its own clamp) is set to the cap.
TRAIT_CAPS: dict[str, str] = {"temporary_willpower": "willpower"}
# Check 6: a NULLABLE_RANGES value below its range becomes unknown (NULL); above, the top.
NULLABLE_BELOW_RANGE_FIX: None = None
# Check 7: one ST relationship per triple; the audit keeps the lowest id, deletes the rest.
ST_RELATIONSHIP_KEY: tuple[str, ...] = ("user_id", "chronicle_id", "gameline")
# Check 8, as the CHECK constraint on scenes says it (ck_scenes_xp_given_finished): XP is
# given only for a finished scene. A breach is a finding without an automatic fix (which
# flag is wrong takes a storyteller). A finished scene still awaiting XP is reported (it
# is work to do, not broken data) and is what the health report counts as awaiting.
SCENE_XP_GIVEN_CHECK = "finished OR NOT xp_given"
SCENE_AWAITING_XP = "finished AND NOT xp_given"

# Validation's cross-row rules (DOMAIN.md "XP flows": every XP movement is a ledger row).
XP_LEDGER_RULE = "xp_matches_ledger"  # characters.xp = sum(xp_ledger.delta)
# A pending spend request names a SPENDABLE_TRAITS trait, a value inside that trait's
# range, and a cost of at least SPEND_COST_MIN (the cost_positive constraint: cost > 0).
SPEND_RULES: tuple[str, ...] = ("spend_trait_known", "spend_value_in_range",
                                "spend_cost_positive")
SPEND_COST_MIN = 1
# Severity of an issue. DOMAIN.md grades nothing; ours: a warning is descriptive data no
# flow reads (ages), an error breaks what a flow or a constraint relies on.
SEVERITIES: tuple[str, ...] = ("error", "warning")
# Health report (DOMAIN.md): the score starts here and never goes below the floor; the
# penalties and thresholds are the HEALTH_* numbers above.
HEALTH_FULL_SCORE = 100
HEALTH_SCORE_FLOOR = 0
WARNING_RULES: frozenset[str] = frozenset({"age_range", "apparent_age_range"})


def severity(rule: str) -> str:
    """error or warning, for a rule key of check_sql(), SPEND_RULES or XP_LEDGER_RULE."""
    return "warning" if rule in WARNING_RULES else "error"


def _canonical(value: object) -> object:
    """A JSON-able, order-stable form of a rule constant (for rules_version)."""
    if isinstance(value, Range):
        return [value.low, value.high, value.default]
    if isinstance(value, dict):
        return [[str(k), _canonical(v)] for k, v in sorted(value.items(), key=lambda i: str(i[0]))]
    if isinstance(value, frozenset | set):
        return sorted(_canonical(v) for v in value)  # type: ignore[type-var]
    if isinstance(value, tuple | list):
        return [_canonical(v) for v in value]
    return value


def rules_version() -> str:
    """A hash of every rule constant of this module (UPPER_CASE data) and of check_sql().

    Validation caches verdicts under it, so any edit of a rule here (a range, a status, a
    cost, a severity) invalidates every cached verdict without anyone bumping a number.
    Computed on each call (cheap: ~50 constants), so constants appended by any section count.
    """
    import hashlib
    import json

    data = {name: _canonical(value) for name, value in sorted(globals().items())
            if name.isupper() and isinstance(value, int | float | str | tuple | list | dict |
                                             frozenset | Range | type(None))}
    data["check_sql()"] = _canonical(check_sql())
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
