"""`warden validate [--incremental] [--character ID]...` and `warden issues`.

`validate` submits a validation.characters job (a large sweep fans out in chunks across
the workers), waits and prints the sweep's totals. Exit 0 when the sweep found no error,
1 when it found errors (warnings do not count), 2 on error.
"""

from __future__ import annotations

import sys

import click

from cli.commands.audit import EXIT_CLEAN, EXIT_FINDINGS, dump, errors_exit_2, run_job


@click.command("validate")
@click.option("--incremental", is_flag=True,
              help="only characters changed since the last successful sweep (cached skip)")
@click.option("--character", "characters", multiple=True, type=click.IntRange(1),
              help="validate only this character (repeatable)")
@click.option("--json", "as_json", is_flag=True)
@click.option("--timeout", default=3600.0, show_default=True, help="seconds to wait")
def validate(incremental: bool, characters: tuple[int, ...], as_json: bool,
             timeout: float) -> None:
    """Validate characters against every rule; exit 0 no error found, 1 errors, 2 error."""
    params: dict[str, object] = {"mode": "incremental" if incremental else "full"}
    if characters:
        params["character_ids"] = list(characters)
    with errors_exit_2():
        job = run_job("validation.characters", params, timeout)
    result = job["result"]
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
