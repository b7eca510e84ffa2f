"""The check generator and the family's params, without a database."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain import checks, rules


def test_every_rule_of_the_rules_module_has_exactly_one_generated_check() -> None:
    # the character rules are check_sql()'s keys, each mapped to one of DOMAIN.md's checks
    assert [r.key for r in checks.CHARACTER_RULES] == list(rules.check_sql())
    assert set(rules.CHARACTER_RULE_CHECKS) == set(rules.check_sql())
    assert (*checks.CHARACTER_CHECKS, checks.ST_CHECK, checks.SCENE_CHECK) == \
        rules.INTEGRITY_CHECKS
    assert len(rules.INTEGRITY_CHECKS) == 8
    # the floors and caps of the fixes are the constraints' own numbers
    assert rules.check_sql()["xp_nonnegative"] == f"xp >= {rules.XP_FLOOR}"
    for column, cap in rules.TRAIT_CAPS.items():
        assert rules.check_sql()[f"{column}_le_{cap}"] == f"{column} <= {cap}"


def test_python_checks_name_each_broken_rule_with_its_severity() -> None:
    row = {"xp": -1, "status": "Zz", **{c: r.low for c, r in rules.TRAIT_RANGES.items()},
           "age": 900, "apparent_age": None}
    row["strength"] = 11
    found = checks.CharacterChecker().check([row[c] for c in checks.CHECK_COLUMNS])
    assert {(i.rule, i.subject, i.severity) for i in found} == {
        ("xp_nonnegative", "xp", "error"), ("status_known", "status", "error"),
        ("strength_range", "strength", "error"), ("age_range", "age", "warning"),
    }
    assert "strength is 11, outside 1..10" in {i.message for i in found}


def test_cross_row_rules() -> None:
    assert checks.ledger_issue(10, 10) is None
    issue = checks.ledger_issue(10, 7)
    assert issue is not None and issue.rule == "xp_matches_ledger" and issue.severity == "error"
    assert checks.spend_issues(5, "strength", 3, 8) == []
    assert [i.rule for i in checks.spend_issues(5, "luck", 3, 8)] == ["spend_trait_known"]
    assert [i.rule for i in checks.spend_issues(5, "strength", 11, 40)] == \
        ["spend_value_in_range"]
    assert [i.rule for i in checks.spend_issues(5, "brawl", 2, 0)] == ["spend_cost_positive"]
    assert {i.subject for i in checks.spend_issues(5, "luck", 0, 0)} == {"xp_spend_request:5"}


def test_rules_version_changes_with_any_rule_and_only_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # given the version of the rules as they are
    version = rules.rules_version()
    assert version == rules.rules_version()  # stable
    # when a range changes, a status is added, or a health number moves, it changes
    for name, value in (
        ("ATTRIBUTE_RANGE", rules.Range(1, 9, 1)),
        ("STATUSES", (*rules.STATUSES, "Gho")),
        ("HEALTH_HEALTHY_AT", 91),
        ("WARNING_RULES", frozenset()),
    ):
        with monkeypatch.context() as m:
            m.setattr(rules, name, value)
            assert rules.rules_version() != version, name
    assert rules.rules_version() == version


def test_integrity_params_refuse_unknown_checks_and_extra_fields() -> None:
    from tasks.audits.schemas import Integrity

    assert Integrity(checks=["scene_xp", "negative_xp", "scene_xp"]).checks == [
        "negative_xp", "scene_xp"]
    with pytest.raises(ValidationError, match="unknown check 'nope'"):
        Integrity(checks=["nope"])
    with pytest.raises(ValidationError):
        Integrity.model_validate({"fix": True, "dry": 1})
    schema = Integrity.model_json_schema()
    assert schema["properties"]["checks"]["anyOf"][0]["items"]["enum"] == list(
        rules.INTEGRITY_CHECKS)


def test_the_audit_is_a_singleton_and_the_alert_retries() -> None:
    from workers.app import registered_job_tasks

    tasks = registered_job_tasks()
    assert tasks["audit.integrity"].singleton is True
    assert tasks["report.deliver_alert"].max_attempts == 8
    assert not tasks["validation.check_chunk"].singleton  # chunks run side by side
