"""The alert rules: compose/alerts.yml is what `warden alerts render` writes, promtool
accepts it and its unit tests pass, every schedule entry has its staleness rule, and every
alert links to a runbook section that exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from schedules import SCHEDULE, Entry
from tests.conftest import ROOT
from workers import alerts

RULES = ROOT / "compose" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def _rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=RULES.parent)


def test_the_committed_rules_are_what_render_writes() -> None:
    # given the committed file; then it is exactly the rendering of the static rules and
    # the schedule (change compose/alerts.static.yml or schedules/, then render)
    assert RULES.read_text() == alerts.render(), "stale: run `warden alerts render`"
    from cli.main import cli

    result = CliRunner().invoke(cli, ["alerts", "render", "--check"])
    assert result.exit_code == 0, result.output


def test_render_check_fails_on_a_stale_file(tmp_path: Any) -> None:
    from cli.main import cli

    stale = tmp_path / "alerts.yml"
    stale.write_text(RULES.read_text().replace("> 600", "> 900", 1))
    result = CliRunner().invoke(cli, ["alerts", "render", "--check", "--output", str(stale)])
    assert result.exit_code == 1
    assert "stale" in result.output


def test_every_schedule_entry_has_a_staleness_rule_of_two_periods() -> None:
    stale = {r["labels"]["entry"]: r for r in _rules() if r["alert"] == "WardenScheduleStale"}
    assert set(stale) == {e.name for e in SCHEDULE}
    for e in SCHEDULE:
        rule = stale[e.name]
        assert rule["labels"]["task"] == e.task
        limits = re.findall(r"> (\d+)", rule["expr"])
        assert limits == [str(int(2 * e.period))] * 2, rule["expr"]


def test_a_new_entry_gets_its_rule_without_anyone_writing_one() -> None:
    from schedules import Entry

    extra = Entry(name="weekly-thing", task="platform.ping", cron={"minute": "0", "hour": "1",
                  "day_of_week": "sun"}, expires=3600, slot_format="%Y-%m-%d")
    text = alerts.render([*SCHEDULE, extra])
    rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    mine = [r for r in rules if r.get("labels", {}).get("entry") == "weekly-thing"]
    assert len(mine) == 1 and "> 1209600" in mine[0]["expr"]  # two weeks


def test_every_alert_links_to_a_runbook_section() -> None:
    anchors = {"docs/runbook.md#" + m.lower()
               for m in re.findall(r"^### (\S+)", RUNBOOK.read_text(), re.MULTILINE)}
    for rule in _rules():
        assert rule["annotations"]["runbook_url"] in anchors, rule["alert"]


def test_promtool_checks_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    done = _promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["nightly:audit", 'say"hi', "", "a" * 101])
def test_an_entry_name_that_would_break_its_key_or_its_rule_is_refused(name: str) -> None:
    # the job event trigger reads the entry back from its jobs' keys `<entry>:<slot>` with
    # split_part(key, ':', 1), and the generated rule quotes it into {entry="..."}: a ':'
    # would file its successes under another name (its alert firing for ever), a quote
    # would break the rules file
    with pytest.raises(ValueError, match="schedule entry name"):
        Entry(name=name, task="platform.ping", cron={"minute": "0"}, expires=60,
              slot_format="%Y-%m-%dT%H")
