"""CLI habits: --version, a light import for --help, the data.task help, the bring-your-own-data examples of docs/usage.md."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from florg.cli.main import app
from florg.config import config_keys

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
HEAVY = ("torch", "transformers", "peft", "flwr", "datasets", "ray", "numpy")


def test_version():
    import florg

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"florg {florg.__version__}"


def test_importing_the_cli_or_florg_loads_no_heavy_package():
    probe = ("import sys, florg, florg.cli.main; "
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_help_runs_without_heavy_packages():
    probe = ("import sys\nfrom typer.testing import CliRunner\nfrom florg.cli.main import app\n"
             "for args in (['--help'], ['run', '--help'], ['predict', '--help'], ['--version']):\n"
             "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
             f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_import_florg_then_peft_registers_the_florg_type():
    probe = ("import florg\nfrom peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
             "print(PEFT_TYPE_TO_CONFIG_MAPPING['FLORG'].__name__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "FLoRGConfig"


def test_data_task_help_lists_every_accepted_form():
    from florg.tasks import task_forms

    help_text = config_keys()["data.task"][1]
    missing = [form for form in task_forms() if form not in help_text]
    assert not missing, missing
    assert "local:<path>" in help_text


def _usage_blocks(lang):
    """docs/usage.md's bring-your-own-data section: its fenced blocks of ``lang``, with the file name above each."""
    text = USAGE.read_text()
    section = text.split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`([\w./-]+\.(?:csv|jsonl|json))`[^`\n]*:\n\n```" + lang + r"\n(.*?)```", section, flags=re.S)


def test_usage_bring_your_own_data_examples_load(tmp_path):
    from florg.data import load_task
    from florg.data.instruct import load_instruct_task
    from florg.data.squad import load_squad

    files = {}
    for lang in ("csv", "jsonl", "json"):
        for name, body in _usage_blocks(lang):
            (tmp_path / name).write_text(body)
            files[name] = tmp_path / name
    assert set(files) == {"reviews.csv", "reviews.jsonl", "instructions.jsonl", "squad.json"}, files
    for name in ("reviews.csv", "reviews.jsonl"):
        data = load_task(f"local:{files[name]}", seed=0, test_fraction=0.25)
        assert sorted(data.label_names) == ["negative", "positive"]
        assert len(data.train) + len(data.test) == 8
    inst = load_instruct_task(f"instruct:{files['instructions.jsonl']}", seed=0, test_fraction=0.25)
    assert len(inst.train) + len(inst.test) == 4
    squad = load_squad(str(files["squad.json"]), seed=0, test_fraction=0.5)
    assert len(squad.train) + len(squad.test) == 4
    doc = json.loads(files["squad.json"].read_text())
    for article in doc["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                for ans in qa["answers"]:
                    start = ans["answer_start"]
                    assert para["context"][start:start + len(ans["text"])] == ans["text"]


@pytest.mark.parametrize("args", [["run", "--help"], ["predict", "--help"]])
def test_subcommand_help(args):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "Usage" in res.stdout
