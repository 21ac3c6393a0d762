"""Post-processing on crafted components, driven by plans keys."""

from __future__ import annotations

import numpy as np

from inference.postprocess import postprocess
from utils.task_settings import build_plans


def _plans(keep: int, tumour: list[int] | None = None, num_classes: int = 3) -> dict:
    return {"num_classes": num_classes, "tumour_classes": tumour or [], "keep_components": keep}


def test_keep_largest_one_and_two() -> None:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[1:6, 1:6, 1:6] = 1  # 125 voxels
    lab[10:12, 10:12, 10:12] = 1  # 8 voxels: < 1/10 of 125
    lab[15:18, 15:18, 15:18] = 2  # 27
    lab[1:4, 15:18, 1:4] = 2  # 27, the second component of class 2 (> 1/10)
    out1 = postprocess(lab, _plans(1))
    assert out1[1:6, 1:6, 1:6].min() == 1 and out1[10:12, 10:12, 10:12].max() == 0
    assert (out1 == 2).sum() == 27  # one of the two equal class-2 components
    out2 = postprocess(lab, _plans(2))
    assert out2[10:12, 10:12, 10:12].max() == 0  # 8 < 125 / 10
    assert (out2 == 2).sum() == 54
    lab[10:13, 10:13, 10:12] = 1  # 18 voxels > 12.5 -> kept by keep_components=2
    out3 = postprocess(lab, _plans(2))
    assert (out3 == 1).sum() == 125 + 18
    assert (postprocess(lab, _plans(1)) == 1).sum() == 125


def test_closing_fills_holes_without_eroding_borders() -> None:
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[0:5, 0:5, 0:5] = 1  # touches the array border
    lab[2, 2, 2] = 0  # a one-voxel hole
    out = postprocess(lab, _plans(1, num_classes=2))
    assert out[0:5, 0:5, 0:5].min() == 1 and (out == 1).sum() == 125


def test_tumour_classes_untouched_and_weight_map() -> None:
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[1:4, 1:4, 1:4] = 2
    lab[10:12, 10:12, 10:12] = 2  # second lesion, much smaller
    lab[6, 6, 6] = 2
    out = postprocess(lab, _plans(1, tumour=[2]))
    np.testing.assert_array_equal(out, lab)  # tumour class: copied as is
    # a big false component outside the body must neither survive nor win over the inside one
    lab = np.zeros((16, 16, 16), np.uint8)
    lab[0:8, 0:8, 0:8] = 1  # outside the weight map
    lab[10:13, 10:13, 10:13] = 1  # inside
    weight = np.zeros_like(lab)
    weight[9:, 9:, 9:] = 1
    out = postprocess(lab, _plans(1, num_classes=2), weight)
    assert (out == 1).sum() == 27 and out[weight == 0].max() == 0


def test_zero_upper_half_x_before_the_largest_component() -> None:
    """Task09_Spleen's rule: the upper half of the last axis (index >= W // 2) is cleared before the
    largest component is kept, so a larger blob there loses to a smaller one in the lower half."""
    label = np.zeros((6, 8, 11), np.uint8)
    label[1:4, 1:4, 1:3] = 1  # small blob, x 1..2 (lower half: W // 2 = 5)
    label[1:5, 1:7, 6:10] = 1  # large blob, x 6..9 (upper half)
    label[2:4, 5:7, 4:7] = 0
    plans = {"num_classes": 2, "tumour_classes": [], "keep_components": 1}
    plain = postprocess(label, plans)
    assert plain[:, :, 5:].any() and not plain[:, :, :5].any()  # the large blob wins
    half = postprocess(label, {**plans, "zero_upper_half_x": True})
    assert not half[:, :, 5:].any()
    np.testing.assert_array_equal(half[:, :, :5], (label[:, :, :5] == 1).astype(np.uint8))
    spleen = build_plans(
        "Task09_Spleen", ["CT"], {0: "background", 1: "spleen"}, [(5.0, 0.8, 0.8)], [(90, 512, 512)]
    )
    assert spleen["zero_upper_half_x"] is True
    other = build_plans(
        "Task03_Liver", ["CT"], {0: "bg", 1: "liver", 2: "tumour"}, [(1.0, 0.8, 0.8)], [(90, 512, 512)]
    )
    assert other["zero_upper_half_x"] is False
    off = build_plans(
        "Task09_Spleen",
        ["CT"],
        {0: "background", 1: "spleen"},
        [(5.0, 0.8, 0.8)],
        [(90, 512, 512)],
        zero_upper_half_x=False,
    )
    assert off["zero_upper_half_x"] is False
