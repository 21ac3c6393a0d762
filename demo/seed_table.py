"""The demo over several seeds: per mode and class, the lowest, mean and spread of the test Dice.

    for s in 13 14 15; do bash train_models.sh --demo --seed $s && cp results/demo/summary.csv runs/seed_$s.csv; done
    python -m demo.seed_table runs/seed_*.csv --floor 0.80

Each input is a ``summary.csv`` of one demo run (:mod:`demo.summary`); its seed is read from the
path (the last number in it; ``default`` when there is none, e.g. ``runs/seed_default/summary.csv``). Prints a Markdown table, one row per (mode, task, class):
seeds, min, mean, max - min, the seed of the minimum, and how many seeds fall below ``--floor``.
Exit status 1 when any does.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_runs(paths: Sequence[Path]) -> dict[tuple[str, str, str], dict[str, float]]:
    """``(mode, task, "class name") -> {seed: dice}``."""
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    for path in paths:
        numbers = re.findall(r"\d+", str(path))
        seed = numbers[-1] if numbers else "default"
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                key = (row["mode"], row["task"], f"{row['class']} {row['class_name']}")
                table.setdefault(key, {})[seed] = float(row["dice"])
    return table


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", type=Path, help="summary.csv files, one per seed")
    ap.add_argument("--floor", type=float, default=0.80, help="the Dice every foreground class must reach")
    args = ap.parse_args(argv)
    table = read_runs(args.summaries)
    below = 0
    print("| mode | task | class | seeds | min | mean | spread (max − min) | seed of min | below floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, task, cls), by_seed in table.items():
        values = np.array(list(by_seed.values()))
        worst = min(by_seed, key=lambda s: by_seed[s])
        n_below = int((values < args.floor).sum())
        below += n_below
        print(
            f"| {mode} | {task} | {cls} | {len(values)} | {values.min():.3f} | {values.mean():.3f} | "
            f"{values.max() - values.min():.3f} | {worst} | {n_below} |"
        )
    print(f"\n{below} (mode, class, seed) value(s) below {args.floor}")
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
