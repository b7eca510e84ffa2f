"""Convention tests: the rules of docs/architecture.md ("Layout and conventions"), kept true
by the build."""

from __future__ import annotations

import re

from celery.schedules import crontab

from schedules import SCHEDULE
from workers.app import registered_job_tasks
from workers.beat import beat_schedule

NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")


def test_every_task_has_family_name_params_and_idempotency_line() -> None:
    tasks = registered_job_tasks()
    assert "platform.ping" in tasks
    for name, task in tasks.items():
        assert NAME.match(name), f"{name}: task names are <family>.<verb_object>"
        assert task.params is not None, f"{name} has no params model"
        doc = task.run.__doc__ or ""
        assert "Idempotency:" in doc, f"{name}: docstring needs an 'Idempotency:' line"


def test_no_plain_celery_task_outside_the_job_core() -> None:
    from workers.app import app

    plain = [n for n, t in registered_job_tasks().items() if t.params is None]
    assert plain == []
    user = [n for n in app.tasks if not n.startswith("celery.")]
    assert set(user) <= set(registered_job_tasks()), "every task must be a JobTask with params"


def test_every_beat_entry_names_a_registered_task_and_expires() -> None:
    tasks = registered_job_tasks()
    assert SCHEDULE, "the schedule is empty"
    for entry in SCHEDULE:
        assert entry.task in tasks, f"{entry.name} names unknown task {entry.task}"
        assert entry.expires > 0, f"{entry.name} has no expires"
        assert entry.slot_format, f"{entry.name} has no slot format"
        tasks[entry.task].params.model_validate(entry.params)  # its params are valid
    for name, spec in beat_schedule().items():
        assert isinstance(spec["schedule"], crontab), name
        assert spec["options"]["expires"] > 0


def test_slot_key_is_the_scheduled_slot_not_the_firing_time() -> None:
    from datetime import UTC, datetime

    from workers.beat import scheduled_time, slot_key

    entry = SCHEDULE[0]  # every 5 minutes, minute slots

    class Fired:
        schedule = crontab(**entry.cron)
        last_run_at = datetime(2026, 11, 23, 10, 5, 2, tzinfo=UTC)

    # the run after 10:05:02 is due at 10:10, whenever beat gets to it (late, or twice)
    due = scheduled_time(Fired())
    assert due is not None
    assert slot_key(entry, due) == f"{entry.name}:2026-11-23T10:10"
    assert scheduled_time(object()) is None


def test_every_task_names_a_scope_and_raises_it_only_by_its_own_params() -> None:
    from workers.models import SCOPES
    from workers.scopes import principal_fields

    for name, task in registered_job_tasks().items():
        # a scope a token can have, read never being enough to submit
        assert task.scope in SCOPES and task.scope != "read", f"{name}: scope {task.scope!r}"
        # admin_when names fields of the params model, and only raises (from enqueue)
        for field in task.admin_when or {}:
            assert field in task.params.model_fields, f"{name}: admin_when names {field!r}"
        assert not (task.admin_when and task.scope == "admin"), f"{name}: admin_when is moot"
        # a field set from the principal is a string the producer may always fill in
        for field in principal_fields(task.params):
            assert not task.params.model_fields[field].is_required(), f"{name}.{field}"
