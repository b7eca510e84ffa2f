"""Validation tasks: a sweep (inline when small, else fanned out in chunks) and its chunks.

A sweep with more candidates than WARDEN_VALIDATION_CHUNK_SIZE hands them to child jobs
(validation.check_chunk, one id range each) through the core's fan-out; each child is
retried on its own, and the parent's task runs again once every child has ended, adding
their results up. The parent's body therefore runs twice: everything before fan_out is
found again by job id (the sweep row), never done twice.
"""

from __future__ import annotations

from typing import Any

from domain import rules
from tasks.validation import service
from tasks.validation.schemas import Characters, Chunk
from workers.app import app
from workers.errors import JobError
from workers.jobs import JobTask
from workers.settings import get_settings

CHUNK_TASK = "validation.check_chunk"


class ChunksFailed(JobError):
    code = "chunks_failed"


@app.task(name="validation.characters", base=JobTask, params=Characters, bind=True)
def characters(self: JobTask, params: Characters) -> dict[str, Any]:
    """Validate characters against every rule, store issues with their lifecycle.

    Idempotency: the sweep row is keyed by the job id; issues are upserted per (character,
    rule, subject) and the job's outcome commits with the last of them (self.complete), so
    a second run converges on the same issues; chunks are child jobs keyed <parent>:<n>.
    """
    settings = get_settings()
    version = rules.rules_version()
    inline: service.ChunkResult | None = None
    result: dict[str, Any] = {}
    with self.session() as session:
        sweep, _ = service.start_sweep(
            session, job_id=self.job_id, mode=params.mode, character_ids=params.character_ids,
            rules_version=version, chunk_size=settings.validation_chunk_size,
            overlap=settings.validation_watermark_overlap)
        if sweep.plan == "inline":
            stored, inline = service.sweep_inline(session, sweep, version,
                                                  settings.validation_watermark_overlap)
            result = self.complete(session, service.sweep_result(stored, []))
    if inline is not None:
        service.remember(inline.verdicts, version, settings.validation_cache_ttl)
        return result

    def build() -> list[tuple[str, dict[str, Any]]]:
        with self.session() as s:
            return [(CHUNK_TASK, p)
                    for p in service.plan_chunks(s, sweep, settings.validation_chunk_size)]

    children = self.fan_out(build)
    ok = [c for c in children if c.status == "succeeded"]
    totals = service.add_totals(c.result or {} for c in ok)
    listed = [{"id": c.id, "status": c.status, "attempts": c.attempts,
               "validated": (c.result or {}).get("validated")} for c in children]
    bad = [c for c in children if c.status != "succeeded"]
    with self.session() as session:
        if bad:
            service.finish_sweep(session, sweep.id, totals, status="failed",
                                 error=f"{len(bad)} of {len(children)} chunks did not succeed")
        else:
            stored = service.finish_sweep(session, sweep.id, totals)
            return self.complete(session, service.sweep_result(stored, listed))
    raise ChunksFailed(f"{len(bad)} of {len(children)} chunks of sweep {sweep.id} did not "
                       f"succeed: " + ", ".join(f"{c.id} {c.status}" for c in bad[:5]),
                       children=listed)


# admin: a sweep's fan-out submits its chunks; submitted on its own, a chunk writes issues
# under a sweep and id range the client names (an operator's repair, never a service's).
@app.task(name=CHUNK_TASK, base=JobTask, params=Chunk, bind=True, scope="admin")
def check_chunk(self: JobTask, params: Chunk) -> dict[str, Any]:
    """Validate one id range of a sweep's candidates and store their issues.

    Idempotency: the issues' upsert and the job's outcome commit in one fenced transaction;
    a re-run (after a retry or a killed worker) validates the same characters again and
    converges on the same issues. Verdicts are cached only after that commit.
    """
    settings = get_settings()
    version = rules.rules_version()
    with self.session() as session:
        sweep = service.sweep_for_chunk(session, params.sweep_id)
        done = service.validate_chunk(
            session, sweep_id=sweep.id, rules_version=version,
            use_cache=sweep.mode == "incremental", id_from=params.id_from, id_to=params.id_to,
            since=sweep.since, character_ids=sweep.character_ids,
            cache_from=sweep.cache_from(settings.validation_watermark_overlap))
        result = self.complete(session, done.as_dict())
    service.remember(done.verdicts, version, settings.validation_cache_ttl)
    return result
