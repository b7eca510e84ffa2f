"""Params of the XP jobs. Trait names and ranges come from domain.rules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from domain import rules

# JSON object keys are strings; pydantic turns "12" into 12. A scene has a handful of
# participants; 1000 keys bounds a request's lock set.
MAX_AWARDS = 1000

SpendableTrait = Literal[rules.SPENDABLE_TRAITS]  # type: ignore[valid-type]
# The new values a spend can ask for, from the rules' ranges: one dot above the lowest
# starting value (a new ability: 0 -> 1) up to the highest top of any spendable trait.
# service.spend checks the trait's own range.
SPEND_VALUE_MIN = min(rules.trait_range(t).low for t in rules.SPENDABLE_TRAITS) + 1
SPEND_VALUE_MAX = max(rules.trait_range(t).high for t in rules.SPENDABLE_TRAITS)


class SceneAward(BaseModel):
    """Award a finished scene's XP: 1 XP to each participant named true."""

    model_config = ConfigDict(extra="forbid")

    scene_id: int = Field(ge=1, description="the scene (must be finished, XP not given yet)")
    awards: dict[int, bool] = Field(
        max_length=MAX_AWARDS,
        description="character id -> whether they earned the scene's XP; every key must be a "
                    "participant",
    )


class XpSpend(BaseModel):
    """Pay now for raising one trait by one dot; a storyteller approves or denies later."""

    model_config = ConfigDict(extra="forbid")

    character_id: int = Field(ge=1)
    trait_name: SpendableTrait = Field(description="a trait column of the character")
    trait_value: int = Field(ge=SPEND_VALUE_MIN, le=SPEND_VALUE_MAX,
                             description="the new value: one above the current value (or "
                                         "above the highest pending request for the same "
                                         "trait)")


class SpendDecision(BaseModel):
    """Approve or deny a pending spend request."""

    model_config = ConfigDict(extra="forbid")

    request_id: int = Field(ge=1)
    decided_by: int = Field(ge=1, description="user id of the deciding storyteller")


class WeeklyApproval(BaseModel):
    """Approve a weekly XP claim (one XP per claimed category)."""

    model_config = ConfigDict(extra="forbid")

    request_id: int = Field(ge=1)
    approved_by: int = Field(ge=1, description="user id of the approving storyteller")
