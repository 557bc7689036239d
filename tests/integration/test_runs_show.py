"""`captioner pipeline run --local` then `captioner runs show`, as a user types them (issue #10, items 1 and 9)."""

import json
import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest
from click.testing import CliRunner

from captioner.cli import cli, main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def local_run(dag_history):
    """The shared first run, typed as `captioner pipeline run --local` (tests/integration/conftest.py),
    and its pipeline root."""
    return dag_history.root, dag_history.run_id, dag_history.cli_output


def test_report_is_an_html_file_shown_as_a_file_url(local_run):
    root, run_id, run_output = local_run
    # kfp.local's own output (executor input JSON, streamed step logs, warnings) goes to the run's log,
    # not to the terminal, which gets one line per step start and end.
    assert "executor_input" not in run_output and "Streamed logs" not in run_output, run_output
    assert "UserWarning" not in run_output and "step train: succeeded" in run_output, run_output
    log = root / "captioner-runs" / f"{run_id}.log"
    assert "executor_input" in log.read_text() and "Streamed logs" in log.read_text()
    assert json.loads((root / "captioner-runs" / f"{run_id}.json").read_text())["log"] == str(log)
    report_line = next(line for line in run_output.splitlines() if line.startswith("report: "))
    assert report_line.startswith("report: file:///") and report_line.endswith("/evaluate/report.html")

    shown = invoke("runs", "show", run_id, "--pipeline-root", str(root))
    assert shown.exit_code == 0, shown.output
    url = next(line for line in shown.output.splitlines() if line.startswith("HTML report: ")).split(": ", 1)[1]
    assert urlparse(url).scheme == "file" and url.endswith(".html"), url
    page = Path(url2pathname(urlparse(url).path))
    assert page.is_file() and page.read_text().lstrip().lower().startswith("<!doctype html")
    # The KFP artifact itself carries the name (what the KFP UI's HTML viewer and a download show).
    record = json.loads(invoke("runs", "show", run_id, "--pipeline-root", str(root), "--json").output)
    assert record["tasks"]["evaluate"]["outputs"]["artifacts"]["report"]["uri"].endswith("report.html")


def test_show_names_step_results_not_kfp_internals(local_run):
    root, run_id, _ = local_run
    output = invoke("runs", "show", run_id, "--pipeline-root", str(root)).output
    assert "Output" not in output and " = " not in output and "gate: True" not in output, output
    lines = [line.strip() for line in output.splitlines()]
    assert any(line.startswith("fingerprint: data=") for line in lines), output
    assert "gate passed: True" in lines and "version: 1" in lines, output
    assert "gate: passed - " in output and "registered version: 1" in lines, output
    # Steps in the order they run: fingerprint first.
    steps = [line.split()[0] for line in output.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert steps == ["fingerprint", "tokenize", "extract-features", "train", "evaluate", "register"], steps


def test_run_ids_match_exactly_or_by_unique_prefix(local_run, tmp_path, capsys):
    root, run_id, _ = local_run
    # A second record whose id ends like the first one's: a suffix match used to pick either.
    records = tmp_path / "root" / "captioner-runs"
    records.mkdir(parents=True)
    shutil.copy(root / "captioner-runs" / f"{run_id}.json", records / f"{run_id}.json")
    other_id = "other-" + run_id
    record = json.loads((records / f"{run_id}.json").read_text())
    record["run_id"] = other_id
    (records / f"{other_id}.json").write_text(json.dumps(record))
    copy = str(tmp_path / "root")

    def show(key):
        code = main(["runs", "show", key, "--pipeline-root", copy])
        out, err = capsys.readouterr()
        return code, out, err

    assert show(run_id)[1].startswith(f"run {run_id}:")
    assert show(run_id[:-3])[1].startswith(f"run {run_id}:")  # a unique prefix
    assert show("other")[1].startswith(f"run {other_id}:")

    code, out, err = show(run_id[-6:])  # the tail of both ids: no longer a match
    assert code == 2 and not out and "no run id is or begins with" in err, err
    assert run_id in err  # the newest ids are listed to pick from

    (records / f"{run_id}-2.json").write_text(json.dumps({**record, "run_id": run_id + "-2"}))
    code, out, err = show(run_id[:-3])
    assert code == 2 and not out and "begins 2 run ids" in err, err
    assert run_id + "," in err and run_id + "-2" in err
    assert show(run_id)[1].startswith(f"run {run_id}:")  # exact wins over prefix
