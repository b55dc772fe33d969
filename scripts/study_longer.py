"""Rerun some of the study's final runs with more rounds, and test whether a gap closes.

Each run is the study's own final run (its resolved ``config.toml`` under
``docs/results/study/runs/<task>/final/<row>/``, same seed, same lr) with only
``train.rounds`` raised, so its first rounds reproduce the committed run exactly (checked here).
Run directories go to ``runs/study-h12-rounds<R>/``; their small files (the ones the study keeps) are copied to
``docs/results/study/rounds<R>/<task>/<row>-seed<seed>/``. Finished runs are skipped.

    .venv/bin/python scripts/study_longer.py --task wordnet-nouns --rows florg,fedit --rounds 10
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from florg.run.rundir import RunDir
from florg.study.spec import COPIED
from florg.study.stats import paired_test, summarise_values

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "docs" / "results" / "study"


def accuracies(run: Path) -> list[float]:
    return [100 * row["test_accuracy"] for row in RunDir(run).read_metrics()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="wordnet-nouns")
    ap.add_argument("--rows", default="florg,fedit", help="study rows; the first is the reference")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    args = ap.parse_args()
    rows, seeds = args.rows.split(","), [int(s) for s in args.seeds.split(",")]
    runs_dir = Path("runs") / f"study-h12-rounds{args.rounds}"  # relative: it is recorded in each config
    out = STUDY / f"rounds{args.rounds}" / args.task
    acc: dict[str, dict[int, list[float]]] = {}
    study_rounds = 0
    for row in rows:
        for seed in seeds:
            finals = sorted((STUDY / "runs" / args.task / "final" / row).glob(f"lr*-seed{seed}"))
            if len(finals) != 1:
                sys.exit(f"no single final run of row {row!r}, seed {seed} on {args.task}: run the study first")
            name = f"{row}-seed{seed}"
            run = ROOT / runs_dir / name
            if not (run / "summary.json").exists():
                subprocess.run(
                    [
                        str(Path(sys.executable).parent / "florg"),
                        "run",
                        "-c",
                        str(finals[0] / "config.toml"),
                        "--set",
                        f"train.rounds={args.rounds}",
                        "--set",
                        f"out_dir={runs_dir}",
                        "--set",
                        f"name={name}",
                        "--no-progress",
                    ],
                    check=True,
                    cwd=ROOT,
                )
            (out / name).mkdir(parents=True, exist_ok=True)
            for f in COPIED:
                shutil.copy2(run / f, out / name / f)
            acc.setdefault(row, {})[seed] = accuracies(out / name)
            ref_acc = accuracies(finals[0])
            study_rounds = len(ref_acc) - 1
            same = acc[row][seed][: len(ref_acc)] == ref_acc
            print(f"{name}: rounds 0-{study_rounds} identical to the study's final run: {same}")
            if not same:
                return 1
    print(f"\nmean test accuracy per round (0-{args.rounds}), {len(seeds)} seeds")
    for row, by in acc.items():
        print(f"  {row:12s}", " ".join(f"{statistics.mean(c):5.1f}" for c in zip(*by.values())))
    ref = rows[0]
    for rnd in (study_rounds, args.rounds):
        for row in rows[1:]:
            s = summarise_values([v[rnd] for v in acc[row].values()])
            r = paired_test({k: v[rnd] for k, v in acc[row].items()}, {k: v[rnd] for k, v in acc[ref].items()})
            print(
                f"round {rnd}: {row} {s.mean:.2f} ± {s.std:.2f}, {ref} "
                f"{summarise_values([v[rnd] for v in acc[ref].values()]).mean:.2f}; {row} − {ref} "
                f"{r.mean:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}], p(t) {r.p_t:.2g}, p(Wilcoxon) {r.p_wilcoxon:.2g}; "
                f"per seed {', '.join(f'{d:+.1f}' for d in r.differences)}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
