"""Regenerate the golden data of ``tests/golden/data`` from the original code (not run by CI).

Usage (from the repository root, with a checkout of huangmozhilv/u2net_torch)::

    python -m tests.golden.make_golden --original PATH/u2net_torch/u2net_torch_src [--only preprocess inference training model]

Each area has a module ``tests/golden/gen_<area>.py`` with

* ``make_inputs(...)``: the synthetic inputs, from fixed seeds, with NumPy and SimpleITK only (the tests
  call it too, so inputs are never stored), and
* ``generate(original, out_path)``: runs the original's own functions (``tests.golden.original``) on
  those inputs and writes ``data/<area>.npz`` with their outputs and the inputs' parameters.

This process imports the original's top-level modules (``utils``, ``config``, ...), whose names clash
with this project's packages: nothing of this project may be imported here or in ``gen_*.py``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

AREAS = ("preprocess", "inference", "training", "model")
DATA_DIR = Path(__file__).resolve().parent / "data"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--original", required=True, help="the original's u2net_torch_src folder")
    parser.add_argument("--only", nargs="+", choices=AREAS, default=list(AREAS), help="areas to regenerate")
    parser.add_argument("--out_dir", default=str(DATA_DIR), help="where the .npz files go")
    args = parser.parse_args()
    from tests.golden.original import load_original

    original = load_original(args.original)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for area in args.only:
        module = importlib.import_module(f"tests.golden.gen_{area}")
        path = out_dir / f"{area}.npz"
        module.generate(original, path)
        print(f"{area}: wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
