"""Post-processing on crafted components, driven by plans keys."""

from __future__ import annotations

import numpy as np

from inference.postprocess import postprocess


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
