"""Train independent models (one per task) or a shared model of the 3D U²-Net.

    python train_model_no_adapters.py --trainMode independent --tasks Task02_Heart Task04_Hippocampus
    python train_model_no_adapters.py --trainMode shared --tasks Task02_Heart Task03_Liver ...

independent: every task gets its own U-Net with its plans' patch, pools and batch size.
shared: one U-Net for all tasks (task-specific heads and norms), trained round robin, every task's
patches resized to one model patch (128³ in the paper preset). Outputs in
results/res_u2net3d_{mode}[_{tag}]/{tasks}/ (checkpoints, TensorBoard, val_dice.csv, train_log.txt).
See docs/training.md.
"""

from training.cli import script_main


def main() -> int:
    """Parse the flags and train (also the console script of ``pip install .``); exits with the status."""
    script_main(
        "train_model_no_adapters.py",
        modes=("independent", "shared"),
        default_mode="independent",
        description=__doc__ or "",
    )
    return 0  # not reached: script_main exits


if __name__ == "__main__":
    main()
