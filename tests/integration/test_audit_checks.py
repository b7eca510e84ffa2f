"""domain.checks against the database: each generated SQL predicate and fix agrees with the
Python check and with the CHECK constraint's own expression, over a grid of values at and
beyond every bound (so neither side can drift from domain/rules.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from domain import checks, rules


def _grid() -> list[dict[str, Any]]:
    """A valid row, then one row per (column, edge value): low-1, low, high, high+1 and
    None for nullable columns; statuses known and unknown; temporary vs willpower."""
    base: dict[str, Any] = {"xp": 0, "status": rules.DEFAULT_STATUS}
    base.update({c: r.low for c, r in rules.TRAIT_RANGES.items()})
    base.update({c: None for c in rules.NULLABLE_RANGES})
    rows = [dict(base)]
    for column, rng in {**rules.TRAIT_RANGES, **rules.NULLABLE_RANGES}.items():
        for value in (rng.low - 1, rng.low, rng.high, rng.high + 1, None):
            if value is None and column in rules.TRAIT_RANGES:
                continue
            rows.append({**base, column: value})
    for xp in (rules.XP_FLOOR - 1, rules.XP_FLOOR, 50):
        rows.append({**base, "xp": xp})
    for status in (*rules.STATUSES, "Zz", ""):
        rows.append({**base, "status": status})
    for column, cap in rules.TRAIT_CAPS.items():
        for value, cap_value in ((3, 3), (4, 3), (2, 3), (11, 12), (9, 0)):
            rows.append({**base, column: value, cap: cap_value})
    return rows


def _evaluate(db: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per row: every rule's generated predicate, the constraint's own expression, and
    every column's generated fix, evaluated by Postgres."""
    cols = checks.CHECK_COLUMNS
    types = {"xp": "integer", "status": "varchar"}
    values = ", ".join(
        "(" + ", ".join(f"CAST(%s AS {types.get(c, 'smallint')})" for c in cols) + ")"
        for _ in rows)
    exprs = [r.sql for r in checks.CHARACTER_RULES]
    exprs += [f"NOT coalesce(({rules.check_sql()[r.key]}), true)" for r in checks.CHARACTER_RULES]
    exprs += [checks.fix_sql(c) for c in cols]
    sql = f"SELECT {', '.join(exprs)} FROM (VALUES {values}) AS t({', '.join(cols)})"
    args = [row[c] for row in rows for c in cols]
    return db.execute(sql, args).fetchall()


def test_generated_sql_python_and_constraints_agree_on_every_edge(
        db: psycopg.Connection[Any]) -> None:
    # given rows at and beyond every bound of every rule
    rows = _grid()
    n = len(checks.CHARACTER_RULES)
    checker = checks.CharacterChecker()
    # when Postgres evaluates the generated predicates and fixes, and Python its checks
    for row, out in zip(rows, _evaluate(db, rows), strict=True):
        sql_broken = {r.key for r, hit in zip(checks.CHARACTER_RULES, out[:n], strict=True)
                      if hit}
        constraint_broken = {r.key for r, hit in zip(checks.CHARACTER_RULES, out[n:2 * n],
                                                     strict=True) if hit}
        python_broken = {i.rule for i in checker.check([row[c] for c in checks.CHECK_COLUMNS])}
        # then all three name the same broken rules
        assert sql_broken == constraint_broken == python_broken, row
        # and the fixed row breaks nothing, while an unbroken column keeps its value
        fixed = dict(zip(checks.CHECK_COLUMNS, out[2 * n:], strict=True))
        assert checker.check([fixed[c] for c in checks.CHECK_COLUMNS]) == [], (row, fixed)
        broken_fields = {checks.RULES_BY_KEY[k].field for k in sql_broken}
        for column in checks.CHECK_COLUMNS:
            if column not in broken_fields:
                assert fixed[column] == row[column], (column, row)


def test_fixes_are_the_ones_domain_md_names(db: psycopg.Connection[Any]) -> None:
    # given one broken value per kind of fix
    base = _grid()[0]
    cases = [
        ({"xp": -4}, {"xp": 0}),  # 1: negative XP -> 0
        ({"status": "Zz"}, {"status": "Un"}),  # 2: unknown status -> Un
        ({"strength": 0}, {"strength": 1}), ({"wits": 14}, {"wits": 10}),  # 3: clamp
        ({"brawl": -1}, {"brawl": 0}), ({"medicine": 11}, {"medicine": 10}),  # 4: clamp
        ({"willpower": 0, "temporary_willpower": 0}, {"willpower": 1}),  # 5: clamp
        ({"willpower": 5, "temporary_willpower": 8}, {"temporary_willpower": 5}),  # 5: cap
        ({"willpower": 11, "temporary_willpower": 12},
         {"willpower": 10, "temporary_willpower": 10}),
        ({"age": -1}, {"age": None}), ({"age": 501}, {"age": 500}),  # 6
        ({"apparent_age": -7}, {"apparent_age": None}),
        ({"apparent_age": 201}, {"apparent_age": 200}),
    ]
    rows = [{**base, **broken} for broken, _ in cases]
    n = len(checks.CHARACTER_RULES)
    for (broken, want), out in zip(cases, _evaluate(db, rows), strict=True):
        fixed = dict(zip(checks.CHECK_COLUMNS, out[2 * n:], strict=True))
        # then each column gets exactly DOMAIN.md's fixed value
        assert {c: fixed[c] for c in want} == want, broken
