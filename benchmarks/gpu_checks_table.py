"""The table of issue 11 from the JSON files of ``benchmarks/run_gpu_checks.sh``: the first version's
GPU figures (H200) beside this run's, and the targets.

    .venv/bin/python benchmarks/gpu_checks_table.py gpu_out/
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

#: the first version's figures (H200, paper preset, fp32 unless stated; docs/performance.md, "GPU")
BEFORE = {
    "dense_step": 0.094,
    "separable_step": 0.152,
    "train_step": 0.822,
    "train_compute": 0.758,
    "train_step_bf16": 0.872,
    "data_wait": 0.35,
    "peak_gib": 16.86,
}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _fmt(v: float | None, unit: str = "s", pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.0f} %" if pct else f"{v:.3f} {unit}".strip()


def build(out: Path) -> str:
    kernels = {r["config"]: r for r in _load(out / "kernels.json").get("models", [])}
    kernels.update({r["config"]: r for r in _load(out / "compile.json").get("models", [])})
    train = {r["config"]: r for r in _load(out / "train.json").get("results", [])}
    prof = _load(out / "profile.json")

    def k(name: str, key: str = "step_s") -> float | None:
        return kernels.get(name, {}).get(key)

    def t(name: str, key: str) -> float | None:
        return train.get(name, {}).get(key)

    rows = [
        ("model-only step, dense independent (fp32)", _fmt(BEFORE["dense_step"]), _fmt(k("dense_fp32")), "–"),
        (
            "model-only step, universal separable, native kernels (fp32)",
            _fmt(BEFORE["separable_step"]),
            _fmt(k("separable_fp32")),
            "≤ dense",
        ),
        (
            "model-only step, universal separable, Triton kernels (fp32)",
            "–",
            _fmt(k("separable_fp32_triton")),
            "≤ dense",
        ),
        (
            "model-only step, universal separable, bf16 (native / Triton)",
            "–",
            f"{_fmt(k('separable_bf16'))} / {_fmt(k('separable_bf16_triton'))}",
            "≤ 0.6 × fp32",
        ),
        (
            "model-only step, universal separable, torch.compile (fp32; first step = compile)",
            "–",
            f"{_fmt(k('separable_compiled'))} (first {_fmt(k('separable_compiled', 'first_step_s'))})",
            "–",
        ),
        ("profiled universal step without loader (phases, fp32)", "–", _fmt(prof.get("total_s")), "–"),
        (
            "full step, universal, real loader, CPU augmentation (fp32)",
            _fmt(BEFORE["train_step"]),
            _fmt(t("universal_fp32", "median_step_s")),
            "≤ 0.15 s",
        ),
        (
            "  of which compute (batch already on the GPU)",
            _fmt(BEFORE["train_compute"]),
            _fmt(t("universal_fp32", "median_compute_step_s")),
            "–",
        ),
        (
            "  GPU waiting for data",
            _fmt(BEFORE["data_wait"], pct=True),
            _fmt(t("universal_fp32", "data_wait_fraction"), pct=True),
            "< 5 %",
        ),
        (
            "full step, universal, GPU augmentation (fp32)",
            "–",
            _fmt(t("universal_fp32+gpuaug", "median_step_s")),
            "≤ 0.15 s",
        ),
        (
            "  GPU waiting for data",
            "–",
            _fmt(t("universal_fp32+gpuaug", "data_wait_fraction"), pct=True),
            "< 5 %",
        ),
        (
            "full step, universal, AMP bf16",
            _fmt(BEFORE["train_step_bf16"]),
            _fmt(t("universal_amp+gpuaug", "median_step_s") or t("universal_amp", "median_step_s")),
            "< fp32",
        ),
        (
            "peak GPU memory, universal step (fp32)",
            _fmt(BEFORE["peak_gib"], "GiB"),
            _fmt(t("universal_fp32", "peak_gpu_mem_gib"), "GiB"),
            "≤ 12 GiB",
        ),
        (
            "peak GPU memory, model-only separable step (fp32)",
            "14.72 GiB",
            _fmt(k("separable_fp32", "peak_gib"), "GiB"),
            "–",
        ),
        (
            "full step, dense independent, real loader (fp32)",
            "0.706 s",
            _fmt(t("independent_fp32", "median_step_s")),
            "–",
        ),
    ]
    lines = ["| what | first version (H200) | this run | target |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder run_gpu_checks.sh wrote its JSON files to")
    args = ap.parse_args(argv)
    table = build(Path(args.out))
    print(table)
    (Path(args.out) / "table.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
