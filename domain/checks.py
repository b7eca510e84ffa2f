"""The rules of domain/rules.py as checks: SQL for the audit, Python for validation.

Why a generator: the seed system's integrity tool drifted from its own model because every
check was written twice. Here each character rule is one entry of `rules.check_sql()` (the
expressions the database's CHECK constraints hold); the audit's SQL predicate is that very
expression, its fix and the validation's Python test are derived from the same ranges, and
the module refuses to import if the two lists ever disagree. tests/integration/
test_audit_checks.py evaluates the SQL and the Python side by side over a grid of values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from domain import rules

Kind = Literal["floor", "enum", "range", "cap", "nullable"]
Level = Literal["finding", "report"]


@dataclass(frozen=True)
class CharacterRule:
    """One rule of a characters row: a key of rules.check_sql() and everything built on it."""

    key: str
    check: str  # the integrity check (DOMAIN.md 1-6) it belongs to
    field: str  # the column a finding names
    kind: Kind
    low: int | None = None
    high: int | None = None
    cap: str | None = None  # kind "cap": the column this one may not exceed

    @property
    def severity(self) -> str:
        return rules.severity(self.key)

    @property
    def sql(self) -> str:
        """True when a row breaks the rule. NULL passes, exactly as in a CHECK constraint."""
        return f"NOT coalesce(({rules.check_sql()[self.key]}), true)"

    @property
    def expected(self) -> str:
        """What the rule wants, in a finding's `expected` and in messages."""
        if self.kind == "floor":
            return f">= {self.low}"
        if self.kind == "enum":
            return "one of " + ", ".join(rules.STATUSES)
        if self.kind == "cap":
            return f"<= {self.cap}"
        if self.kind == "nullable":
            return f"{self.low}..{self.high} or unknown"
        return f"{self.low}..{self.high}"

    def broken(self, value: Any, cap_value: Any = None) -> bool:
        """The Python test: True when `value` (and, for a cap, `cap_value`) breaks the rule."""
        if value is None:
            return False
        if self.kind == "floor":
            return bool(value < self.low)
        if self.kind == "enum":
            return value not in rules.STATUSES
        if self.kind == "cap":
            return cap_value is not None and value > cap_value
        assert self.low is not None and self.high is not None
        return not self.low <= value <= self.high

    def message(self, value: Any, cap_value: Any = None) -> str:
        if self.kind == "enum":
            return f"status {value!r} is not a known code ({', '.join(rules.STATUSES)})"
        if self.kind == "cap":
            return f"{self.field} {value} is above {self.cap} {cap_value}"
        return f"{self.field} is {value}, outside {self.expected}"


def _build_character_rules() -> tuple[CharacterRule, ...]:
    check_of = rules.CHARACTER_RULE_CHECKS
    built = [
        CharacterRule("xp_nonnegative", check_of["xp_nonnegative"], "xp", "floor",
                      low=rules.XP_FLOOR),
        CharacterRule("status_known", check_of["status_known"], "status", "enum"),
    ]
    for name, rng in rules.TRAIT_RANGES.items():
        key = f"{name}_range"
        built.append(CharacterRule(key, check_of[key], name, "range", rng.low, rng.high))
    for name, cap in rules.TRAIT_CAPS.items():
        key = f"{name}_le_{cap}"
        built.append(CharacterRule(key, check_of[key], name, "cap", cap=cap))
    for name, rng in rules.NULLABLE_RANGES.items():
        key = f"{name}_range"
        built.append(CharacterRule(key, check_of[key], name, "nullable", rng.low, rng.high))
    keys = [r.key for r in built]
    if sorted(keys) != sorted(rules.check_sql()) or set(check_of) != set(keys):
        raise RuntimeError(
            "domain.checks is out of step with domain.rules: check_sql() has "
            f"{sorted(set(rules.check_sql()) ^ set(keys))} that the generator does not know"
        )
    return tuple(built)


CHARACTER_RULES: tuple[CharacterRule, ...] = _build_character_rules()
RULES_BY_KEY: dict[str, CharacterRule] = {r.key: r for r in CHARACTER_RULES}
CHARACTER_CHECKS: tuple[str, ...] = tuple(dict.fromkeys(r.check for r in CHARACTER_RULES))
# Every column a character rule reads, in one order (the audit's and validation's SELECT).
CHECK_COLUMNS: tuple[str, ...] = ("xp", "status", *rules.TRAIT_RANGES, *rules.NULLABLE_RANGES)
ST_CHECK = "duplicate_st_relationships"
SCENE_CHECK = "scene_xp"
assert set(CHARACTER_CHECKS) | {ST_CHECK, SCENE_CHECK} == set(rules.INTEGRITY_CHECKS)


def rules_of(checks: Sequence[str]) -> tuple[CharacterRule, ...]:
    """The character rules of the named checks."""
    return tuple(r for r in CHARACTER_RULES if r.check in checks)


def any_broken_sql(selected: Sequence[CharacterRule]) -> str:
    """SQL true when a characters row breaks any of the rules (one predicate per rule,
    OR-ed: the scan evaluates them all in one pass over the row)."""
    return "(" + " OR ".join(r.sql for r in selected) + ")" if selected else "false"


def _clamp_sql(column: str) -> str:
    rng = rules.TRAIT_RANGES[column]
    return f"greatest({rng.low}, least({rng.high}, {column}))"


def fix_sql(column: str) -> str:
    """SQL for a column's value once every rule on it is fixed (an unbroken value maps to
    itself), over the row's current columns. DOMAIN.md's fixes, from rules.py's data."""
    if column == "xp":
        return f"greatest(xp, {rules.XP_FLOOR})"
    if column == "status":
        return (f"CASE WHEN {rules.check_sql()['status_known']} THEN status "
                f"ELSE '{rules.DEFAULT_STATUS}' END")
    if column in rules.TRAIT_RANGES:
        clamp = _clamp_sql(column)
        cap = rules.TRAIT_CAPS.get(column)
        return f"least({clamp}, {_clamp_sql(cap)})" if cap else clamp
    rng = rules.NULLABLE_RANGES[column]
    below = "NULL" if rules.NULLABLE_BELOW_RANGE_FIX is None else str(
        rules.NULLABLE_BELOW_RANGE_FIX)
    return (f"CASE WHEN {column} < {rng.low} THEN {below} "
            f"WHEN {column} > {rng.high} THEN {rng.high} ELSE {column} END")


def fixed_columns(selected: Sequence[CharacterRule]) -> tuple[str, ...]:
    """The columns a fix of these rules may change (a cap rule changes only its column)."""
    return tuple(dict.fromkeys(r.field for r in selected))


# -- scenes and ST relationships (checks 7 and 8) ----------------------------------------------

@dataclass(frozen=True)
class SceneRule:
    """A rule of a scenes row (check 8); `level` report = listed, not counted as broken."""

    key: str
    level: Level
    sql: str  # true when the scene is in this state
    expected: str


SCENE_RULES: tuple[SceneRule, ...] = (
    SceneRule("xp_given_unfinished", "finding",
              f"NOT coalesce(({rules.SCENE_XP_GIVEN_CHECK}), true)",
              f"xp_given only when finished ({rules.SCENE_XP_GIVEN_CHECK})"),
    SceneRule("scene_awaiting_xp", "report", f"({rules.SCENE_AWAITING_XP})",
              "XP awarded once a scene is finished"),
)
ST_RULE = "st_relationship_unique"
ST_KEY_SQL = ", ".join(rules.ST_RELATIONSHIP_KEY)


def scenes_broken_sql() -> str:
    """SQL true when a scenes row is in any state of check 8 (finding or report)."""
    return "(" + " OR ".join(r.sql for r in SCENE_RULES) + ")"


@dataclass(frozen=True)
class ViolationIndex:
    """A partial index of the rows breaking any rule of a table: PostgreSQL evaluates the
    rules at every write of a row, so the audit reads the offenders from the index instead
    of evaluating ~35 predicates on every row (docs/adr/0011). `tag` (the index's comment)
    names the predicate it was built with; an index built for other rules is not used."""

    table: str
    name: str
    predicate: str

    @property
    def tag(self) -> str:
        return predicate_tag(self.predicate)


def predicate_tag(predicate: str) -> str:
    """`warden-rules:<hash of the predicate>`, the comment a violation index carries."""
    import hashlib

    return "warden-rules:" + hashlib.sha256(predicate.encode()).hexdigest()[:16]


VIOLATION_INDEXES: dict[str, ViolationIndex] = {
    "characters": ViolationIndex("characters", "ix_characters_broken",
                                 any_broken_sql(CHARACTER_RULES)),
    "scenes": ViolationIndex("scenes", "ix_scenes_broken", scenes_broken_sql()),
}


# -- validation: the same character rules in Python, plus the cross-row rules ------------------

@dataclass(frozen=True)
class Issue:
    """One broken rule of one character, as validation stores it."""

    rule: str
    subject: str  # the field, or the row of another table (xp_spend_request:<id>)
    severity: str
    message: str


class CharacterChecker:
    """Every character rule over a row laid out as CHECK_COLUMNS.

    Why index tuples instead of calling CharacterRule.broken per rule: a full sweep checks
    ~35 rules on every character, and the loop below is the validation's hot path (its
    characters-per-second figure is in bench/validation.py).
    """

    def __init__(self) -> None:
        pos = {c: i for i, c in enumerate(CHECK_COLUMNS)}
        self._ranges: list[tuple[int, int, int, CharacterRule]] = []
        self._others: list[tuple[int, int | None, CharacterRule]] = []
        for r in CHARACTER_RULES:
            if r.kind == "range":
                assert r.low is not None and r.high is not None
                self._ranges.append((pos[r.field], r.low, r.high, r))
            else:
                self._others.append((pos[r.field], pos[r.cap] if r.cap else None, r))

    def check(self, row: Sequence[Any]) -> list[Issue]:
        """The issues of one character (an empty list for a clean one)."""
        found: list[Issue] | None = None
        for i, low, high, rule in self._ranges:
            v = row[i]
            if v is not None and not low <= v <= high:
                found = found or []
                found.append(Issue(rule.key, rule.field, rule.severity, rule.message(v)))
        for i, j, rule in self._others:
            v = row[i]
            cap_value = row[j] if j is not None else None
            if rule.broken(v, cap_value):
                found = found or []
                found.append(Issue(rule.key, rule.field, rule.severity,
                                   rule.message(v, cap_value)))
        return found or []


def ledger_issue(xp: int, ledger_total: int) -> Issue | None:
    """xp must equal the sum of the character's XP ledger."""
    if xp == ledger_total:
        return None
    rule = rules.XP_LEDGER_RULE
    return Issue(rule, "xp", rules.severity(rule),
                 f"xp is {xp} but the XP ledger sums to {ledger_total}")


def spend_issues(request_id: int, trait_name: str, trait_value: int, cost: int) -> list[Issue]:
    """A pending spend request names a spendable trait, a value in its range, a cost > 0."""
    found: list[Issue] = []
    known, in_range, positive = rules.SPEND_RULES
    subject = f"xp_spend_request:{request_id}"
    if trait_name not in rules.SPENDABLE_TRAITS:
        found.append(Issue(known, subject, rules.severity(known),
                           f"pending spend request {request_id} names unknown trait "
                           f"{trait_name!r}"))
    else:
        rng = rules.TRAIT_RANGES[trait_name]
        if not rng.contains(trait_value):
            found.append(Issue(in_range, subject, rules.severity(in_range),
                               f"pending spend request {request_id} raises {trait_name} to "
                               f"{trait_value}, outside {rng.low}..{rng.high}"))
    if cost < rules.SPEND_COST_MIN:
        found.append(Issue(positive, subject, rules.severity(positive),
                           f"pending spend request {request_id} costs {cost}; it must be at "
                           f"least {rules.SPEND_COST_MIN}"))
    return found


VALIDATION_RULES: tuple[str, ...] = (*(r.key for r in CHARACTER_RULES), rules.XP_LEDGER_RULE,
                                     *rules.SPEND_RULES)


# -- counts (the health report's data_integrity figures) ---------------------------------------

def character_counts_sql() -> str:
    """One pass over characters: per rule, how many rows break it."""
    counts = ", ".join(f"count(*) FILTER (WHERE {r.sql}) AS {r.key}" for r in CHARACTER_RULES)
    return f"SELECT {counts} FROM characters WHERE {any_broken_sql(CHARACTER_RULES)}"


def scene_counts_sql() -> str:
    """One pass over scenes: per rule of check 8, how many scenes are in that state."""
    counts = ", ".join(f"count(*) FILTER (WHERE {r.sql}) AS {r.key}" for r in SCENE_RULES)
    return f"SELECT {counts} FROM scenes WHERE " + " OR ".join(r.sql for r in SCENE_RULES)


def st_duplicates_sql() -> str:
    """One pass over st_relationships: rows beyond the first of each triple (check 7)."""
    return f"SELECT count(*) - count(DISTINCT ({ST_KEY_SQL})) FROM st_relationships"
