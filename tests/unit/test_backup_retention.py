"""Retention as a pure function, on a crafted list of 60 days of nightly backups.

The expected sets are worked out by hand from the calendar (comments below), not by
re-running the algorithm.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tasks.backups.retention import Candidate, Policy, decide

FIRST_NIGHT = datetime(2026, 10, 2, 2, 30, tzinfo=UTC)  # a Friday


def nightly(verdicts: dict[int, str | None] | None = None) -> list[Candidate]:
    """ids 1..60: one backup a night at 02:30 UTC, 2026-10-02 (id 1) .. 2026-11-30 (id 60);
    verdict `passed` unless `verdicts` says otherwise."""
    verdicts = verdicts or {}
    return [Candidate(i, FIRST_NIGHT + timedelta(days=i - 1), verdicts.get(i, "passed"))
            for i in range(1, 61)]


def crafted() -> list[Candidate]:
    """The 60 nights, plus: a manual backup on the last day (61, never verified), older
    monthly ones (62..68, mid-month Sep back to Mar), a failed verification (57, Nov 27),
    two not yet verified (58, 59), and a verification running on an old one (20)."""
    backups = nightly({57: "failed", 58: None, 59: None})
    backups = [Candidate(b.id, b.taken_at, b.verdict, verifying=b.id == 20) for b in backups]
    backups.append(Candidate(61, datetime(2026, 11, 30, 14, 0, tzinfo=UTC), None))
    for n, month in enumerate(range(9, 2, -1)):  # 62 = Sep 15 ... 68 = Mar 15
        backups.append(Candidate(62 + n, datetime(2026, month, 15, 2, 30, tzinfo=UTC), "passed"))
    return backups


def test_keeps_exactly_the_expected_set_of_60_days() -> None:
    # given the crafted backups and the default policy (7 daily, 4 weekly, 6 monthly)
    backups = crafted()
    # when retention decides
    decision = decide(backups, Policy(7, 4, 6), UTC)
    # then it keeps, by hand from the calendar:
    # daily, the 7 latest days with a usable backup: Nov 30 (61, the newest that day), 29
    #   (59), 28 (58), Nov 27 skipped (its only backup failed verification), 26, 25, 24, 23
    daily = {61, 59, 58, 56, 55, 54, 53}
    # weekly, ISO weeks: W49 (Mon Nov 30) -> 61, W48 (Nov 23-29) -> 59 (Sun Nov 29),
    #   W47 -> 52 (Sun Nov 22), W46 -> 45 (Sun Nov 15)
    weekly = {61, 59, 52, 45}
    # monthly: Nov -> 61, Oct -> 30 (Oct 31), Sep 15 (62), Aug (63), Jul (64), Jun (65)
    monthly = {61, 30, 62, 63, 64, 65}
    # and, outside every slot: 60, the newest backup that passed verification (Nov 30
    # 02:30; 61 of the same day is newer but unverified), and 20 (verification running)
    protected = {60, 20}
    assert set(decision.keep) == daily | weekly | monthly | protected
    assert len(decision.keep) == 16
    # and everything else goes, the failed one (57) and May..Mar (66..68) included
    assert set(decision.delete) == set(range(1, 69)) - set(decision.keep)
    assert {57, 66, 67, 68} <= set(decision.delete)
    assert list(decision.delete) == sorted(decision.delete, key=lambda i: next(
        b.taken_at for b in backups if b.id == i))  # oldest first
    # and each kept backup says why
    assert decision.keep[61] == ("daily 2026-11-30", "weekly 2026-W49", "monthly 2026-11")
    assert decision.keep[60] == ("newest verified",)
    assert decision.keep[20] == ("verification running",)


def test_never_deletes_the_newest_verified_backup_however_old() -> None:
    # given 60 nights where every verification since Oct 10 (id 9) failed
    backups = nightly({i: "failed" for i in range(9, 61)})
    # when retention keeps only one daily and nothing else
    decision = decide(backups, Policy(daily=1, weekly=0, monthly=0), UTC)
    # then the one daily slot goes to the newest usable backup (id 8, the failed ones fill
    # no slot), and it is also the newest verified: nothing else survives
    assert decision.keep == {8: ("daily 2026-10-09", "newest verified")}
    # and with a zero policy the newest verified backup is still kept
    none = decide(backups, Policy(0, 0, 0), UTC)
    assert none.keep == {8: ("newest verified",)}
    assert len(none.delete) == 59


def test_an_empty_list_and_a_single_backup() -> None:
    assert decide([], Policy(), UTC).keep == {}
    one = [Candidate(1, FIRST_NIGHT, None)]
    assert set(decide(one, Policy(), UTC).keep) == {1}


def test_days_are_calendar_days_of_the_configured_timezone() -> None:
    # given two backups 30 minutes apart around midnight in Berlin (UTC+1 in December)
    early = Candidate(1, datetime(2026, 12, 1, 22, 50, tzinfo=UTC), "passed")  # 23:50 Berlin
    late = Candidate(2, datetime(2026, 12, 1, 23, 20, tzinfo=UTC), "passed")  # 00:20, Dec 2
    # when keeping 2 daily, in UTC both are Dec 1 (one slot); in Berlin they are two days
    in_utc = decide([early, late], Policy(2, 0, 0), UTC)
    in_berlin = decide([early, late], Policy(2, 0, 0), ZoneInfo("Europe/Berlin"))
    assert in_utc.delete == (1,)
    assert in_berlin.delete == ()


def test_the_policy_comes_from_the_settings_and_a_job_may_override_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.backups.service import policy_from_settings
    from workers.settings import get_settings

    # given WARDEN_BACKUP_KEEP_* set, the policy follows them; the defaults are 7/4/6
    assert Policy() == Policy(7, 4, 6)
    monkeypatch.setenv("WARDEN_BACKUP_KEEP_DAILY", "3")
    monkeypatch.setenv("WARDEN_BACKUP_KEEP_WEEKLY", "2")
    monkeypatch.setenv("WARDEN_BACKUP_KEEP_MONTHLY", "0")
    get_settings.cache_clear()
    try:
        assert policy_from_settings() == Policy(3, 2, 0)
        # and a prune job's params override one limit, the others still from the settings
        assert policy_from_settings(weekly=5) == Policy(3, 5, 0)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


def test_the_nightly_entries_run_create_then_prune_and_create_verifies() -> None:
    from schedules import SCHEDULE

    # given the beat schedule, the backup runs nightly and asks for its verification
    entries = {e.task: e for e in SCHEDULE if e.task.startswith("backup.")}
    assert set(entries) == {"backup.create", "backup.prune"}
    create, prune = entries["backup.create"], entries["backup.prune"]
    assert create.params == {"verify": True}
    assert create.period == prune.period == 86400
    # and prune comes later the same night (the verification of the new backup, submitted
    # by the create job, is kept by prune while it runs)
    assert int(create.cron["hour"]) < int(prune.cron["hour"])
