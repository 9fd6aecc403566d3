import subprocess
import sys

import pytest
from typer.testing import CliRunner

from curate.cli import app

COMMANDS = ["run", "select", "demo", "show-spec", "report", "sweep", "diff"]


@pytest.mark.parametrize("cmd", [None, *COMMANDS])
def test_every_command_has_help(cmd):
    args = [cmd, "--help"] if cmd else ["--help"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_show_spec_rejects_a_typo_with_the_key_name(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text('name = "x"\n[input]\npaths = ["a"]\n[selection.clip]\nmin_scor = 0.3\n')
    res = CliRunner().invoke(app, ["show-spec", str(p)])
    assert res.exit_code == 2
    assert "selection.clip.min_scor" in res.output


def test_select_on_a_directory_that_is_not_a_run(tmp_path):
    res = CliRunner().invoke(app, ["select", str(tmp_path), "--name", "x"])
    assert res.exit_code == 2 and "not a curate run directory" in res.output


def test_one_import_namespace(tmp_path):
    """`filters`, `reports` and `pipelines` are only reachable as curate.*; nothing generic is installed."""
    code = (
        "import importlib.util as u, curate.filters, curate.reports, curate.pipelines;"
        "assert all(u.find_spec(n) is None for n in ('filters', 'reports', 'pipelines')), 'generic top-level name importable'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)


def test_run_with_the_local_executor_refuses_a_cluster_address(tmp_path):
    res = CliRunner().invoke(app, ["run", "demo", "--executor", "local", "--address", "auto", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--executor local" in res.output and "--address" in res.output
    res = CliRunner().invoke(app, ["run", "demo", "--executor", "dask", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "'ray' or 'local'" in res.output
