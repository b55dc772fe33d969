"""`florg` command-line errors: one line naming the field and the fix, exit code 2, no run directory."""

import pytest
from typer.testing import CliRunner

from florg.cli.main import app


def florg(*args, cwd, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "train.roundz=3"], "train.rounds"),
        (["--set", "data.alpha=0"], "data.alpha"),
        (["--set", "method.rank=0"], "method.rank"),
        (["--set", "method.florg.procrustes=sideways"], "method.florg.procrustes"),
        (["--set", "method.name=fedfoo"], "method.name"),
        (["--set", "data.data_dir=/nonexistent/wordnet"], "data_dir"),
        (["--set", "model.name=/nonexistent/model"], "model"),
        (["--set", "data.num_clients=50", "--set", "data.max_train_examples=20"], "data.num_clients"),
        (["--set", "model.target_modules=['nosuchmodule']"], "nosuchmodule"),
        (["--set", "method.rank=500"], "rank"),
        (["--config", "missing.toml"], "missing.toml"),
        (["--set", "data.task=glue/rte"], "data.data_dir"),
        (["--set", "federation.faults=bogus@1"], "federation.faults"),
        (["--set", "federation.min_train_nodes=30"], "federation.min_train_nodes"),
        (["--set", "train.rounds=abc"], "train.rounds"),
        (["--set", "privacy.mode=local", "--set", "method.name=fedit"], "privacy"),
        (["--resume", "."], "--resume takes its config from RUN_DIR/config.toml"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_run_dir(tmp_path, monkeypatch, args, needle):
    small = ["--set", "data.max_train_examples=200", "--set", "data.max_test_examples=50"]
    res = florg("run", "--set", f"out_dir={tmp_path / 'runs'}", *small, *args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert res.exit_code == 2, res.stderr[-2000:]
    err_lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1, res.stderr[-2000:]
    assert needle in err_lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_config_command_prints_resolved_toml(tmp_path):
    res = florg("config", "--set", "train.rounds=3", cwd=tmp_path)
    assert res.exit_code == 0
    assert "rounds = 3" in res.stdout


def test_config_shows_each_method_s_recommended_settings_and_applies_them(tmp_path, monkeypatch):
    from florg.methods.registry import METHODS

    monkeypatch.setattr(METHODS["fedit"], "recommended", {"train.lr": 0.0125, "train.head_lr": 0.03})
    res = florg("config", "--keys", cwd=tmp_path)
    assert res.exit_code == 0
    row = next(line for line in res.stdout.splitlines() if "fedit" in line and "train.lr" in line)
    assert "0.0125" in row and "train.head_lr" in row
    res = florg("config", "--set", "method.name=fedit", cwd=tmp_path)
    assert "lr = 0.0125" in res.stdout and "head_lr = 0.03" in res.stdout
    res = florg("config", "--set", "method.name=fedit", "--set", "train.lr=0.002", cwd=tmp_path)
    assert "lr = 0.002" in res.stdout and "head_lr = 0.0\n" in res.stdout  # the head follows the lr set


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
    res = florg("run", "--resume", str(tmp_path), cwd=tmp_path, monkeypatch=monkeypatch)
    assert res.exit_code == 2
    assert "not a florg run directory" in res.stderr and "Traceback" not in res.stderr


def test_data_dir_flag_is_the_data_dir_key(tmp_path, monkeypatch):
    res = florg("run", "--data-dir", str(tmp_path / "nowordnet"), "--set", f"out_dir={tmp_path / 'runs'}",
                cwd=tmp_path, monkeypatch=monkeypatch)
    assert res.exit_code == 2
    assert "wordnet-base" in res.stderr and "data.data_dir" in res.stderr
    assert not (tmp_path / "runs").exists()
