"""``python -m models``: print a model's parameter report (total, shared, per task, vs independent)."""

from __future__ import annotations

import argparse
import sys

from models.report import TaskSpec, format_report, task_spec
from models.unet import ADAPTER_MODULES, TRAIN_MODES


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m models",
        description="Parameter report of a 3D U²-Net: total, shared and per-task parameters, and the ratio "
        "to one independent model per task.",
    )
    p.add_argument(
        "--train_mode", choices=TRAIN_MODES, default="universal", help="which model (default universal)"
    )
    p.add_argument(
        "--module",
        choices=ADAPTER_MODULES,
        default=None,
        help="adapter of the universal model (default separable_adapter)",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="task names; modalities/classes/pools come from --plans_dir/<task>/plans.json or, for the "
        "six paper tasks, from the paper preset (default: the paper's five tasks)",
    )
    p.add_argument("--plans_dir", default="prepData", help="preprocessed data folder with <task>/plans.json")
    p.add_argument("--in_channels", type=int, nargs="+", help="modalities per task (instead of --tasks)")
    p.add_argument("--num_classes", type=int, nargs="+", help="classes per task, background included")
    p.add_argument(
        "--pools",
        type=int,
        nargs=3,
        default=None,
        metavar=("Z", "Y", "X"),
        help="pools per axis of the shared/universal model (default 5 5 5), and of the independent "
        "models when --in_channels is used",
    )
    p.add_argument("--base_channels", type=int, default=16, help="channels of the first level (default 16)")
    args = p.parse_args(argv)

    try:
        if args.in_channels or args.num_classes:
            if not (args.in_channels and args.num_classes) or len(args.in_channels) != len(args.num_classes):
                p.error("--in_channels and --num_classes need the same number of values")
            pools = tuple(args.pools or (5, 5, 5))
            specs = [
                TaskSpec(f"task{i}", m, k, pools)
                for i, (m, k) in enumerate(zip(args.in_channels, args.num_classes, strict=True))
            ]
        else:
            names = args.tasks or [
                "Task02_Heart",
                "Task03_Liver",
                "Task04_Hippocampus",
                "Task05_Prostate",
                "Task07_Pancreas",
            ]
            specs = [task_spec(n, args.plans_dir) for n in names]
        print(
            format_report(
                args.train_mode,
                specs,
                module=args.module,
                base_channels=args.base_channels,
                model_pools=tuple(args.pools or (5, 5, 5)),
            )
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
