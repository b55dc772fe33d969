"""The one-command device check runs end to end in its CPU dry-run mode (tiny shapes), as CI runs it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # runs the device check end to end (the fast lane: -m "not slow")
def test_gpu_check_dry_run_prints_the_table_and_updates_only_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nkept text\n\n<!-- section:other -->\nother section\n<!-- /section:other -->\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--results", str(results)]
    for _ in range(2):  # the second run replaces the section instead of adding another
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for label in ("(a) client step, Llama tiny", "(b) aggregation", "(c) parity float32", "(d) 2 clients x 2 rounds"):
        assert label in out, label
    text = results.read_text()
    assert text.startswith("# results\n\nkept text\n") and "other section" in text
    assert text.count("<!-- section:gpu-check -->") == 1 and text.count("<!-- /section:gpu-check -->") == 1
    assert "Dry run on the CPU with tiny shapes" in text and "| (b) aggregation" in text
    data = json.loads((tmp_path / "results_gpu_check_dry.json").read_text())
    assert data["dry_run"] and {"a", "b", "c", "d", "env"} <= set(data)
    assert data["c"]["float32"]["max_rel_diff"] == 0.0  # CPU against CPU in the dry run
    assert data["b"]["max_rel_diff_vs_cpu"] == 0.0
    assert all(a["florg_tokens_s"] > 0 and a["lora_peak_bytes"] > 0 for a in data["a"])
    assert data["d"]["florg"]["median_client_s"] > 0 and len(data["d"]["florg"]["per_client_s"]) == 4


def test_gpu_check_imports_no_flower_ray_or_datasets():
    code = ("import sys, benchmarks.gpu_check as g; import florg.methods, florg.train, florg.device, florg.adapters, florg.core; "
            "from florg.run.experiment import float32_trainables; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'ray', 'datasets', 'flwr_datasets', "
            "'pandas'}); print(bad); sys.exit(1 if bad else 0)")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
