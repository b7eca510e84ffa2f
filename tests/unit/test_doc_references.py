"""Every file the docs name is in the repository (drill D10: `DOMAIN.md` and
`../shared/ARCHITECTURE.md` were cited by the README, `warden seed --help`, the job-type
descriptions and docstrings, and were not in a clone)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A path (`docs/adr/0007`, `compose/alerts.yml`, `../shared/X.md`) or a bare Markdown file
# (`DOMAIN.md`); a bare `service.py` is a family's, named in its context.
REF = re.compile(r"(?<![\w/.-])((?:\.\./)+[\w./-]*[\w-]"
                 r"|(?:docs|workers|tasks|domain|cli|api_stub|tests|compose|schedules|bench|"
                 r"\.ci)/[\w./-]*[\w-]|[\w.-]+\.md)\b")
# Not files of this repository: where a process writes, or examples of other names.
NOT_FILES = {".warden/admin-token", "compose/.env", "workers/migrations/versions/000N_"}


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    return out + [p for p in ("DOMAIN.md",) if (ROOT / p).exists()]


def _exists(ref: str, base: Path, tracked: list[str]) -> bool:
    for start in (base, ROOT):
        target = (start / ref).resolve()
        try:
            rel = str(target.relative_to(ROOT))
        except ValueError:
            continue  # outside the repository: a dead reference in a clone
        if any(t == rel or t.startswith(rel + "/") or t.startswith(rel + "-") for t in tracked):
            return True
    return False


# A design doc names the files it will add: `<!-- planned: a.py b.py -->` in the doc itself,
# so each one is a deliberate, visible exception (and is dropped once the file exists).
PLANNED = re.compile(r"<!--\s*planned:([^>]*)-->")


def dead_references(text: str, base: Path, tracked: list[str]) -> list[str]:
    planned = {p for m in PLANNED.findall(text) for p in m.split()}
    return sorted({m for m in REF.findall(text)
                   if m not in NOT_FILES | planned and not _exists(m, base, tracked)})


def test_the_docs_name_only_files_that_are_in_the_repository() -> None:
    tracked = _tracked()
    docs = [d for d in (ROOT / "README.md", ROOT / "DOMAIN.md") if d.exists()]
    docs += sorted((ROOT / "docs").rglob("*.md"))
    dead = {str(d.relative_to(ROOT)): found for d in docs
            if (found := dead_references(d.read_text(), d.parent, tracked))}
    assert dead == {}


def test_the_job_type_descriptions_and_cli_help_name_only_files_in_the_repository() -> None:
    from click.testing import CliRunner

    from api_stub.app import job_type_catalogue
    from cli.main import cli

    tracked = _tracked()
    text = "\n".join(t.description for t in job_type_catalogue())
    runner = CliRunner()
    for name in cli.list_commands(None):  # type: ignore[arg-type]
        text += runner.invoke(cli, [name, "--help"]).output
    assert dead_references(text, ROOT, tracked) == []
    assert "DOMAIN.md" in text  # what made this test: it is cited, so it must be here
