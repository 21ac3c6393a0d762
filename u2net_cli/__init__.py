"""The console scripts of the installed package (``pip install .``), one function per command.

================================  ================================================  =========================
command                           same as                                           function
================================  ================================================  =========================
``u2net-explore``                 ``python data_explore.py``                        :func:`explore`
``u2net-preprocess``              ``python preprocess_taskSep.py``                  :func:`preprocess`
``u2net-train-no-adapters``       ``python train_model_no_adapters.py``             :func:`train_no_adapters`
``u2net-train-wt-adapters``       ``python train_model_wt_adapters.py``             :func:`train_wt_adapters`
``u2net-predict``                 ``python predict.py``                             :func:`predict`
``u2net-export``                  ``python -m models.export``                       :func:`export`
``u2net-report``                  ``python -m reporting``                           :func:`report`
================================  ================================================  =========================

Each calls the script's own ``main`` (the top-level scripts stay the original's interface and are
installed as modules beside the packages), with the same flags and exit status. The scripts are
imported only when their command runs, so ``--help`` of one command loads nothing of the others.

Imports: every package and the top-level scripts (this is the outermost layer).
"""

from __future__ import annotations

__all__ = [
    "explore",
    "export",
    "predict",
    "preprocess",
    "report",
    "train_no_adapters",
    "train_wt_adapters",
]


def explore() -> int:
    """``u2net-explore``: per-case header/label facts and per-task statistics (``data_explore.py``)."""
    import data_explore

    return data_explore.main()


def preprocess() -> int:
    """``u2net-preprocess``: crop, resample, normalise tasks (``preprocess_taskSep.py``)."""
    import preprocess_taskSep

    return preprocess_taskSep.main()


def train_no_adapters() -> int:
    """``u2net-train-no-adapters``: independent or shared models (``train_model_no_adapters.py``)."""
    import train_model_no_adapters

    return train_model_no_adapters.main()


def train_wt_adapters() -> int:
    """``u2net-train-wt-adapters``: the universal model, or a shared one; new domains (``train_model_wt_adapters.py``)."""
    import train_model_wt_adapters

    return train_model_wt_adapters.main()


def predict() -> int:
    """``u2net-predict``: segment images with a checkpoint or an exported domain (``predict.py``)."""
    import predict as script

    return script.main(tune_cpu_allocator=True)


def export() -> int:
    """``u2net-export``: one domain as a standalone ONNX or TorchScript network (``python -m models.export``)."""
    from models.export import main

    return main()


def report() -> int:
    """``u2net-report``: PNG figures and one offline ``report.html`` (``python -m reporting``)."""
    from reporting.__main__ import main

    return main()
