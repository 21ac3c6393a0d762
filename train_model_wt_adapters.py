"""Train the universal 3D U²-Net (shared U-Net + per-task adapters) or a shared model; adapt either to
a new domain.

    python train_model_wt_adapters.py --trainMode universal --module separable_adapter \\
        --tasks Task02_Heart Task03_Liver Task04_Hippocampus Task05_Prostate Task07_Pancreas
    python train_model_wt_adapters.py --trainMode universal --tasks Task09_Spleen \\
        --ckp results/res_u2net3d_universal/Task02_Heart_.../checkpoints/best.pt --out_tag adapted2spleen

One model for all tasks, trained round robin (step k trains task (k-1) mod T), every task's patches
resized to one model patch (128³ in the paper preset). With --ckp the trained model gets the new
task's parts and only those train; the old tasks' outputs stay bit-identical. Outputs in
results/res_u2net3d_{mode}[_{tag}]/{tasks}/. See docs/training.md.
"""

from training.cli import script_main


def main() -> int:
    """Parse the flags and train (also the console script of ``pip install .``); exits with the status."""
    script_main(
        "train_model_wt_adapters.py",
        modes=("shared", "universal"),
        default_mode="universal",
        description=__doc__ or "",
    )
    return 0  # not reached: script_main exits


if __name__ == "__main__":
    main()
