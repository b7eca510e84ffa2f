"""The rules module and the settings' refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cli.up import flower_credentials
from domain import rules
from workers.jobs import backoff
from workers.settings import Settings, SettingsError


def test_status_machine_allows_only_listed_transitions() -> None:
    assert rules.can_transition("Un", "Sub")
    assert rules.can_transition("Ret", "App")
    assert not rules.can_transition("Dec", "App")
    assert not rules.can_transition("Un", "App")
    assert not rules.can_transition("Zz", "Un")


def test_ranges_and_clamp() -> None:
    assert rules.trait_range("strength").clamp(15) == 10
    assert rules.trait_range("brawl").clamp(-3) == 0
    assert not rules.trait_range("age").contains(None)
    assert rules.trait_range("apparent_age").contains(200)
    assert len(rules.ATTRIBUTES) == 9
    assert len(rules.ABILITIES) == 19


def test_prod_refuses_placeholder_secrets() -> None:
    base = {"env": "prod", "database_url": "postgresql://x/y", "redis_url": "redis://x"}
    with pytest.raises(ValidationError, match="FLOWER_PASSWORD"):
        Settings(**base, flower_password="change-me")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="WARDEN_REDIS_URL"):
        Settings(env="prod", database_url="postgresql://x/y", redis_url=None)  # type: ignore[arg-type]
    # an unset Flower password stops only Flower (its API needs auth), not every process
    unset = Settings(**base)  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match="FLOWER_PASSWORD"):
        flower_credentials(unset)
    ok = Settings(**base, flower_password="x7-long-random")  # type: ignore[arg-type]
    assert flower_credentials(ok) == ("warden", "x7-long-random")


def test_visibility_timeout_must_exceed_hard_limit() -> None:
    with pytest.raises(ValidationError, match="VISIBILITY"):
        Settings(task_time_limit=100, task_soft_time_limit=90, visibility_timeout=100)
    assert Settings(task_time_limit=100, task_soft_time_limit=90).effective_visibility_timeout > 100


def test_secrets_do_not_show_in_repr() -> None:
    s = Settings(database_url="postgresql://u:hunter2@h/db")  # type: ignore[arg-type]
    assert "hunter2" not in repr(s)


def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    for attempt, full in ((1, 2.0), (2, 4.0), (3, 8.0), (20, 300.0)):
        samples = [backoff(attempt, base=2.0, cap=300.0) for _ in range(200)]
        assert all(full / 2 <= s <= full for s in samples)
        assert max(samples) - min(samples) > 0  # jittered, not constant
