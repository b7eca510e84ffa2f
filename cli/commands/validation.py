"""`warden validate [--incremental] [--character ID]...` and `warden issues`.

`validate` submits a validation.characters job (a large sweep fans out in chunks across
the workers), waits and prints the sweep's totals; `--inline` runs the sweep in this
process against WARDEN_DATABASE_URL (cli/inline.py), its chunks one after the other. Exit 0
when the sweep found no error, 1 when it found errors (warnings do not count), 2 on error.
"""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING, Any

import click

from cli.commands.audit import (
    EXIT_CLEAN,
    EXIT_FINDINGS,
    dump,
    errors_exit_2,
    fail,
    inline_option,
    run_job,
    to_stderr,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tasks.validation.schemas import Characters
    from tasks.validation.service import ChunkResult, Sweep


@click.command("validate")
@click.option("--incremental", is_flag=True,
              help="only characters changed since the last successful sweep (cached skip)")
@click.option("--character", "characters", multiple=True, type=click.IntRange(1),
              help="validate only this character (repeatable)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=3600.0, show_default=True,
              help="seconds to wait for the job (not used with --inline)")
@inline_option("the sweep")
def validate(incremental: bool, characters: tuple[int, ...], as_json: bool,
             timeout: float, inline: bool) -> None:
    """Validate characters against every rule; exit 0 no error found, 1 errors, 2 error.

    --inline runs the sweep here, on the database WARDEN_DATABASE_URL names, and prints the
    same. It is still a validation.characters job of that database: its job_runs row
    (source cli-inline, run by this process, never retried) is the job_id of the stored
    sweep. A sweep too big for one chunk is planned in the same chunks a worker's would
    fan out, validated one after the other here (no child jobs: `children` is empty).
    The verdict cache lives in Redis, so an inline sweep neither reads nor writes it: an
    incremental one validates every changed character again (cache_hits=0).
    """
    params: dict[str, Any] = {"mode": "incremental" if incremental else "full"}
    if characters:
        params["character_ids"] = list(characters)
    with errors_exit_2():
        if characters:
            _refuse_unknown_characters(characters)
        if inline:
            from tasks.validation.schemas import Characters

            result = _validate_inline(Characters.model_validate(params))
        else:
            result = run_job("validation.characters", params, timeout)["result"]
    totals = result["totals"]
    if as_json:
        dump(result)
    else:
        click.echo(f"sweep {result['sweep_id']} ({result['mode']}, {result['plan']}, "
                   f"{result['chunks']} chunks): candidates={totals['candidates']} "
                   f"cache_hits={totals['cache_hits']} validated={totals['validated']} "
                   f"issues={totals['issues']} opened={totals['opened']} "
                   f"resolved={totals['resolved']} open_now={totals['open_issues']}")
    sys.exit(EXIT_FINDINGS if totals["issues"].get("error") else EXIT_CLEAN)


def _refuse_unknown_characters(ids: tuple[int, ...]) -> None:
    """`--character` names characters that exist, or nothing is submitted: a sweep of none
    would exit 0 ("candidates=0") and look like a clean character (drill D9)."""
    from sqlalchemy import select

    from domain.models import Character
    from workers.db import session_scope

    with session_scope() as s:
        found = set(s.scalars(select(Character.id).where(Character.id.in_(ids))))
    missing = sorted(set(ids) - found)
    if missing:
        fail(f"no character {', '.join(map(str, missing))}; nothing validated", 2)


def _validate_inline(params: Characters) -> dict[str, Any]:
    """What the validation.characters task does (and its chunk jobs), in this process;
    returns the job's result."""
    from cli import inline
    from domain import rules
    from tasks.validation import service
    from workers.settings import get_settings

    settings = get_settings()
    version = rules.rules_version()
    with inline.run("validation.characters", params, echo=to_stderr) as job:
        with job.session() as session:
            sweep, _ = service.start_sweep(
                session, job_id=job.id, mode=params.mode, character_ids=params.character_ids,
                rules_version=version, chunk_size=settings.validation_chunk_size,
                overlap=settings.validation_watermark_overlap)
            if sweep.plan == "inline":
                done = _chunk(session, sweep, version)
                stored = service.finish_sweep(session, sweep.id, done.as_dict())
                return dict(job.complete(session, service.sweep_result(stored, [])))
        with job.session() as session:
            chunks = service.plan_chunks(session, sweep, settings.validation_chunk_size)
        parts: list[dict[str, Any]] = []
        try:
            for n, chunk in enumerate(chunks, 1):
                with job.session() as session:
                    parts.append(_chunk(session, sweep, version, chunk["id_from"],
                                        chunk["id_to"]).as_dict())
                job.progress(n, len(chunks), step="chunks validated")
        except Exception as exc:
            # As a worker's sweep whose chunks failed: the sweep says so (the watermark of
            # the next incremental sweep is a succeeded sweep's, never this one's).
            with contextlib.suppress(Exception), job.session() as session:
                service.finish_sweep(session, sweep.id, service.add_totals(parts),
                                     status="failed", error=f"chunk {len(parts) + 1} of "
                                                            f"{len(chunks)} failed: {exc}")
            raise
        with job.session() as session:
            stored = service.finish_sweep(session, sweep.id, service.add_totals(parts))
            return dict(job.complete(session, service.sweep_result(stored, [])))


def _chunk(session: Session, sweep: Sweep, version: str, id_from: int | None = None,
           id_to: int | None = None) -> ChunkResult:
    """One chunk as check_chunk validates it, without the Redis verdict cache."""
    from tasks.validation import service

    return service.validate_chunk(
        session, sweep_id=sweep.id, rules_version=version, use_cache=False, id_from=id_from,
        id_to=id_to, since=sweep.since, character_ids=sweep.character_ids)


@click.command("issues")
@click.option("--character", "character_id", type=click.IntRange(1), default=None)
@click.option("--state", type=click.Choice(["open", "resolved", "all"]), default="open",
              show_default=True)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
def issues(character_id: int | None, state: str, limit: int, as_json: bool) -> None:
    """Validation issues, newest first, with when each was first seen, last seen, fixed."""
    from tasks.validation import service
    from tasks.validation.schemas import IssueOut
    from workers.db import session_scope

    with errors_exit_2(), session_scope() as s:
        rows = service.issues(s, character_id=character_id, state=state, limit=limit)
    if as_json:
        dump([IssueOut(**r).model_dump(mode="json") for r in rows])
        return
    for r in rows:
        resolved = f" resolved {r['resolved_at']:%Y-%m-%d %H:%M}" if r["resolved_at"] else ""
        click.echo(f"{r['id']:<8} character {r['character_id']:<9} {r['severity']:<7} "
                   f"{r['rule']:<32} first {r['first_seen']:%Y-%m-%d %H:%M} "
                   f"last {r['last_seen']:%Y-%m-%d %H:%M}{resolved}  {r['message']}")


COMMANDS: list[click.Command] = [validate, issues]
