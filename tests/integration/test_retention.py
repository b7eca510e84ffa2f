"""Job retention: platform.prune_jobs, run by a real worker, deletes exactly the finished
jobs past their retention and keeps everything an operator or a parent still needs."""

from __future__ import annotations

import json
import uuid

import psycopg

from tests.conftest import Proc, wait_for_status
from workers.enqueue import submit

TYPE = f"testing.retention_{uuid.uuid4().hex[:6]}"  # rows of this test only


def _job(db: psycopg.Connection, status: str, finished_days_ago: float | None,
         parent: str | None = None, created_days_ago: float | None = None) -> str:
    job_id = str(uuid.uuid4())
    created = created_days_ago if created_days_ago is not None else (finished_days_ago or 0) + 1
    db.execute(
        "INSERT INTO job_runs (id, type, params, status, created_at, finished_at, parent_id, "
        "attempts) VALUES (%s, %s, %s::jsonb, %s, now() - make_interval(days => %s), "
        "CASE WHEN %s::float8 IS NULL THEN NULL "
        "ELSE now() - make_interval(secs => %s::float8 * 86400) END, %s, 1)",
        (job_id, TYPE, json.dumps({}), status, int(created), finished_days_ago,
         finished_days_ago, parent))
    if parent:
        db.execute("UPDATE job_runs SET children_total = children_total + 1 WHERE id = %s",
                   (parent,))
    return job_id


def _left(db: psycopg.Connection, ids: dict[str, str]) -> set[str]:
    rows = db.execute("SELECT id::text FROM job_runs WHERE id = ANY(%s::uuid[])",
                      (list(ids.values()),)).fetchall()
    present = {r[0] for r in rows}
    return {name for name, i in ids.items() if i in present}


def test_prune_deletes_exactly_what_is_past_retention(db: psycopg.Connection,
                                                       worker: Proc) -> None:
    # given finished jobs around the 30-day and 90-day retentions, unfinished old jobs, and
    # families of parents and children
    ids = {
        "succeeded_40d": _job(db, "succeeded", 40),
        "succeeded_10d": _job(db, "succeeded", 10),
        "cancelled_31d": _job(db, "cancelled", 31),
        "failed_40d": _job(db, "failed", 40),
        "dead_89d": _job(db, "dead", 89),
        "failed_100d": _job(db, "failed", 100),
        "dead_91d": _job(db, "dead", 91),
        "queued_created_60d": _job(db, "queued", None, created_days_ago=60),
        # created 50 days ago but finished yesterday: its retention counts from its end
        "succeeded_created_50d_finished_1d": _job(db, "succeeded", 1, created_days_ago=50),
    }
    ids["parent_running"] = _job(db, "running", None, created_days_ago=45)
    ids["child_of_running_40d"] = _job(db, "succeeded", 40, parent=ids["parent_running"])
    ids["parent_with_young_failed_child"] = _job(db, "succeeded", 40)
    ids["young_failed_child"] = _job(db, "failed", 40,
                                     parent=ids["parent_with_young_failed_child"])
    ids["old_parent"] = _job(db, "succeeded", 40)
    ids["old_child"] = _job(db, "succeeded", 40, parent=ids["old_parent"])

    # when a dry run is asked for, nothing goes and the counts say what would
    dry = submit("platform.prune_jobs", {"dry_run": True})
    row = wait_for_status(str(dry.job["id"]), {"succeeded", "failed", "dead"}, timeout=60)
    assert row["status"] == "succeeded", row
    assert _left(db, ids) == set(ids)
    would = row["result"]["would_delete"]  # type: ignore[index]
    assert would["succeeded"] >= 3 and would["failed"] >= 1 and would["dead"] >= 1

    # when the prune runs
    job = submit("platform.prune_jobs", {"batch_size": 100})
    row = wait_for_status(str(job.job["id"]), {"succeeded", "failed", "dead"}, timeout=60)
    assert row["status"] == "succeeded", row

    # then exactly the jobs past their retention are gone
    assert _left(db, ids) == {
        "succeeded_10d", "failed_40d", "dead_89d", "queued_created_60d",
        "succeeded_created_50d_finished_1d", "parent_running", "child_of_running_40d",
        "parent_with_young_failed_child", "young_failed_child",
    }
    assert row["result"]["deleted"]["succeeded"] >= 3  # type: ignore[index]

    # and a second run deletes nothing more of them
    again = submit("platform.prune_jobs", {})
    wait_for_status(str(again.job["id"]), {"succeeded"}, timeout=60)
    assert len(_left(db, ids)) == 9


def test_a_fan_out_goes_only_as_a_whole(db: psycopg.Connection, worker: Proc) -> None:
    # given fan-outs whose members are past their own retention at different times: while
    # a failed or dead member can still be retried (90 days), the parent may run again and
    # read all its children back (`fan_out` returns them), so none of them may go alone
    ids: dict[str, str] = {}
    # a failed parent (retryable for 90 days) whose chunks succeeded 40 days ago
    ids["failed_parent_40d"] = _job(db, "failed", 40)
    ids["its_succeeded_child_40d"] = _job(db, "succeeded", 40, parent=ids["failed_parent_40d"])
    # a succeeded parent with a failed chunk (retrying it reopens the parent) and a
    # succeeded one
    ids["succeeded_parent_40d"] = _job(db, "succeeded", 40)
    ids["its_failed_child_40d"] = _job(db, "failed", 40, parent=ids["succeeded_parent_40d"])
    ids["its_succeeded_sibling_40d"] = _job(db, "succeeded", 40,
                                            parent=ids["succeeded_parent_40d"])
    # a family every member of which is past its own retention
    ids["dead_parent_95d"] = _job(db, "dead", 95)
    ids["its_succeeded_child_35d"] = _job(db, "succeeded", 35, parent=ids["dead_parent_95d"])
    ids["its_failed_child_91d"] = _job(db, "failed", 91, parent=ids["dead_parent_95d"])

    # when the dry run counts and the prune runs
    dry = submit("platform.prune_jobs", {"dry_run": True})
    counted = wait_for_status(str(dry.job["id"]), {"succeeded", "failed", "dead"}, timeout=60)
    assert counted["status"] == "succeeded", counted
    job = submit("platform.prune_jobs", {"batch_size": 100})
    row = wait_for_status(str(job.job["id"]), {"succeeded", "failed", "dead"}, timeout=60)
    assert row["status"] == "succeeded", row

    # then the families that may still run again are whole, and the one past every member's
    # retention is gone, children with their parent
    assert _left(db, ids) == {
        "failed_parent_40d", "its_succeeded_child_40d",
        "succeeded_parent_40d", "its_failed_child_40d", "its_succeeded_sibling_40d",
    }
    # and the counts include the children that went with their parent
    assert counted["result"]["would_delete"]["dead"] >= 3  # type: ignore[index]
    assert row["result"]["deleted"]["dead"] >= 3  # type: ignore[index]
