"""``pip install .`` into a fresh virtual environment: the console scripts work from any folder.

The new environment sees this interpreter's packages through a ``.pth`` file (torch and the rest are not
installed again), and the project is installed with ``--no-deps --no-index --no-build-isolation``, so
nothing can be downloaded, least of all another torch. The sources are copied first, so that the build
writes nothing into the checkout and the installed package cannot lean on files left out of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from tests.dicomkit import ct_phantom, tiny_ct_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "u2net-explore": "--dataset_dir",
    "u2net-preprocess": "--prep_dir",
    "u2net-train-no-adapters": "--trainMode {independent,shared}",
    "u2net-train-wt-adapters": "--trainMode {shared,universal}",
    "u2net-predict": "--output_format {nifti,mha,nrrd,dicom-seg}",
    "u2net-export": "--format",
    "u2net-report": "--results_dir",
}


#: runs the console scripts named on its command line with --help, as their installed entry points
HELP_ALL = """
import importlib.metadata as m, sys
points = {e.name: e for e in m.entry_points(group="console_scripts") if e.value.startswith("u2net_cli:")}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    try:
        points[name].load()()
    except SystemExit as e:
        assert e.code in (0, None), (name, e.code)
    print("=== end " + name, flush=True)
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.slow
def test_pip_install_console_scripts_from_any_folder(tmp_path: Path) -> None:
    setuptools = pytest.importorskip(
        "setuptools", reason="building the package needs setuptools (requirements-dev.txt)"
    )
    if tuple(int(v) for v in setuptools.__version__.split(".")[:2]) < (70, 1):
        pytest.skip("setuptools >= 70.1 builds wheels by itself (requirements-dev.txt pins it)")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(REPO / name, src / name)
    for module in (
        "data_explore",
        "preprocess_taskSep",
        "predict",
        "train_model_no_adapters",
        "train_model_wt_adapters",
    ):
        shutil.copy(REPO / f"{module}.py", src / f"{module}.py")
    for package in ("models", "inference", "utils", "training", "demo", "reporting", "u2net_cli"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_parent_env.pth").write_text("".join(f"{p}\n" for p in sorted(parent)))
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            str(src),
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    # the package is the installed copy, not the checkout; its dependencies are requirements.txt's pins
    where = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, predict, utils; print(utils.__file__); "
            "print(predict.__file__); print(m.requires('u2net3d'))",
        ],  # fmt: skip
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert all(line.startswith(str(venv)) for line in where[:2]), where
    assert "torch==2.13.0" in where[2] and "SimpleITK==2.5.3" in where[2]
    # every console script is installed and answers --help from a folder outside the repository: the two
    # light ones through their wrappers, all seven through their entry points in one process (torch loads once)
    assert all(os.access(venv / "bin" / name, os.X_OK) for name in SCRIPTS)
    for name in ("u2net-explore", "u2net-preprocess"):
        run = subprocess.run(
            [str(venv / "bin" / name), "--help"], cwd=tmp_path, env=_env(), capture_output=True, text=True
        )
        assert run.returncode == 0 and f"usage: {name}" in run.stdout and SCRIPTS[name] in run.stdout, run
    helps = subprocess.run(
        [str(python), "-c", HELP_ALL, *SCRIPTS], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert helps.returncode == 0, helps.stderr
    texts = dict(zip(SCRIPTS, helps.stdout.split("=== end ")[:-1], strict=True))
    for name, text in texts.items():
        assert "usage:" in text and SCRIPTS[name] in text, (name, text)
    # and u2net-predict segments an image there
    work = tmp_path / "elsewhere"
    work.mkdir()
    tiny_ct_checkpoint(work / "model.pt")
    image = sitk.GetImageFromArray(ct_phantom().astype(np.int16))
    image.SetSpacing((0.8, 0.9, 2.5))
    sitk.WriteImage(image, str(work / "scan.mha"))
    run = subprocess.run(
        [
            str(venv / "bin" / "u2net-predict"),
            "--ckp",
            "model.pt",
            "--input",
            "scan.mha",
            "--output",
            "seg",
            "--no_progress",
        ],  # fmt: skip
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    label = sitk.ReadImage(str(work / "seg" / "scan.mha"))
    assert label.GetSize() == image.GetSize() and label.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    assert not (REPO / "build").exists() or (REPO / "build").stat().st_mtime < src.stat().st_mtime
