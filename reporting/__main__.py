"""``python -m reporting``: PNG figures and one offline ``report.html``.

    # training curves of any run (a run folder, or a folder of run folders)
    python -m reporting --run results/res_u2net3d_universal_paper/Task02_..._Task07_Pancreas

    # an evaluation (what the laptop demo writes): summary, charts, curves, test-case overlays
    python -m reporting --results_dir results/demo --dataset_dir dataset_demo \\
        --eval independent=results/demo/res_u2net3d_independent_demo --eval universal=... \\
        [--export_file results/demo/export/Task92_DemoHippoMR.pt --compare exported=universal]

Prints the page's path. Exit status 0, or 1 with ``--strict`` when something was wrong (label maps
that ``--compare`` finds different, a broken link), 2 for bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reporting.build import evaluation_report, run_report


def _pair(text: str, flag: str) -> tuple[str, str]:
    a, sep, b = text.partition("=")
    if not sep or not a or not b:
        raise argparse.ArgumentTypeError(f"{flag} needs NAME=VALUE, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reporting",
        description="Visual report (PNG figures, report.html; no display needed). Either --run (training "
        "curves of run folders) or --results_dir with --eval (an evaluation). See docs/export_and_report.md.",
    )
    p.add_argument(
        "--run",
        nargs="+",
        default=None,
        metavar="DIR",
        help="training run folder(s), or folders of run folders: curves (loss per task, learning rate, "
        "validation Dice per class) and parameters",
    )
    p.add_argument("--results_dir", default=None, help="evaluation: folder with summary.csv and predictions/")
    p.add_argument(
        "--dataset_dir", default=None, help="evaluation: <task>/imagesTs and labelsTs of the test cases"
    )
    p.add_argument(
        "--eval",
        action="append",
        default=[],
        metavar="MODE=FOLDER",
        type=lambda s: _pair(s, "--eval"),
        help="evaluation: a mode and the run folder(s) of its checkpoint(s); repeat per mode",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="A=B",
        type=lambda s: _pair(s, "--compare"),
        help="evaluation: predictions/A/<task>/ must hold the same label maps as predictions/B/<task>/",
    )
    p.add_argument(
        "--export_file",
        action="append",
        default=[],
        metavar="FILE",
        help="evaluation: an exported domain to list",
    )
    p.add_argument("--max_cases", type=int, default=10, help="evaluation: overlays per task (0 = all)")
    p.add_argument(
        "--out", default=None, help="where report.html goes (default: --results_dir, or the first --run)"
    )
    p.add_argument("--title", default="", help="the page's title")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="evaluation: processes that draw the curves and overlays (forked; default 1 = here, one after another)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a comparison or a link fails")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if (args.run is None) == (args.results_dir is None):
        p.error("give either --run DIR... or --results_dir (with --dataset_dir and --eval)")
    try:
        if args.run is not None:
            report = run_report(args.run, args.out, title=args.title)
        else:
            if args.dataset_dir is None:
                p.error("--results_dir needs --dataset_dir")
            kw = {"title": args.title} if args.title else {}
            report = evaluation_report(
                args.results_dir,
                args.dataset_dir,
                args.eval,
                compare=args.compare,
                export_files=args.export_file,
                out_dir=args.out,
                max_cases=args.max_cases or None,
                workers=args.workers,
                **kw,
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"reporting: {e}", file=sys.stderr)
        return 2
    for problem in report.problems:
        print(f"reporting: {problem}", file=sys.stderr)
    print(f"report: {report.page} ({len(report.images)} images)")
    return 1 if report.problems and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
