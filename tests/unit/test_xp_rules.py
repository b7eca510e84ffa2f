"""XP costs, params and the adaptive batch size: pure rules, no services."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain import rules
from tasks.xp.schemas import SceneAward, XpSpend


def test_costs_are_the_classic_table() -> None:
    # given the seed system's costs: attribute x4, ability x2 (new: 3), willpower x1
    assert rules.xp_cost("attribute", 3) == 8
    assert rules.xp_cost("ability", 1) == 3
    assert rules.xp_cost("ability", 4) == 6
    assert rules.xp_cost("willpower", 6) == 5
    # then a value that cannot be bought is refused, and costs invert where they can
    with pytest.raises(ValueError):
        rules.xp_cost("attribute", 1)
    with pytest.raises(ValueError):
        rules.xp_cost("background", 2)
    assert rules.value_for_cost("attribute", 8) == 3
    assert rules.value_for_cost("attribute", 5) is None
    assert rules.value_for_cost("ability", 3) == 1
    assert rules.value_for_cost("nope", 3) is None


def test_award_keys_become_ids_and_unknown_fields_are_refused() -> None:
    assert SceneAward.model_validate({"scene_id": 4, "awards": {"12": True}}).awards == {12: True}
    with pytest.raises(ValidationError):
        SceneAward.model_validate({"scene_id": 4, "awards": {}, "bonus": 1})
    with pytest.raises(ValidationError) as err:
        XpSpend.model_validate({"character_id": 1, "trait_name": "luck", "trait_value": 2})
    assert err.value.errors()[0]["loc"] == ("trait_name",)


def test_batch_size_moves_toward_half_the_budget_in_bounded_steps() -> None:
    from tasks.data_migrations.service import _next_size
    from workers.settings import Settings

    settings = Settings(migration_batch_seconds=1.0, migration_batch_min=10,
                        migration_batch_max=5000)
    # a fast batch grows by at most 1.5x; a slow one shrinks by at most half; bounds hold
    assert _next_size(1000, 0.1, settings) == 1500
    assert _next_size(1000, 0.5, settings) == 1000
    assert _next_size(1000, 4.0, settings) == 500
    assert _next_size(4000, 0.01, settings) == 5000
    assert _next_size(12, 9.0, settings) == 10


def test_spend_params_take_their_bounds_from_the_rules() -> None:
    # given the lowest new value (a new ability, 0 -> 1) and the highest top of any range
    low = rules.ABILITY_RANGE.low + 1
    high = max(r.high for r in (rules.ATTRIBUTE_RANGE, rules.ABILITY_RANGE,
                                rules.WILLPOWER_RANGE))
    # then the params accept exactly those bounds, and the catalogue's schema says so
    for value in (low, high):
        assert XpSpend(character_id=1, trait_name="brawl", trait_value=value).trait_value == value
    for value in (low - 1, high + 1):
        with pytest.raises(ValidationError):
            XpSpend(character_id=1, trait_name="brawl", trait_value=value)
    schema = XpSpend.model_json_schema()["properties"]["trait_value"]
    assert (schema["minimum"], schema["maximum"]) == (low, high)


def test_rate_and_eta_leave_out_paused_and_throttled_time() -> None:
    from cli.commands.migrate import render
    from tasks.data_migrations.service import _rate

    # given 1,000 of 3,000 rows done in 10 s of running time, after an hour paused and
    # twenty minutes throttled
    row: dict[str, object] = {"name": "m", "status": "running", "rows_done": 1000,
                              "rows_total": 3000, "seconds_running": 10.0,
                              "seconds_paused": 3600.0, "seconds_throttled": 1200.0,
                              "rejected": 0}
    # then the rate is 100 rows/s and the ETA 20 s: the waits count in neither
    rate, eta = _rate(row)  # type: ignore[arg-type]
    assert (rate, eta) == (100.0, 20.0)
    # and the progress bar shows them, with the waits apart
    line = render({**row, "rows_per_second": rate, "eta_seconds": eta})
    assert "100 rows/s" in line and "ETA 0:00:20" in line
    assert "paused 1:00:00" in line and "throttled 0:20:00" in line
