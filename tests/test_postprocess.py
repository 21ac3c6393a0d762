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


def test_closing_over_the_whole_grid_erodes_its_faces() -> None:
    """The original closes the whole array with SciPy's default border (outside = background): a blob
    on the array's faces loses its face voxels; the hole is filled. ``closing_border="keep"``
    (the previous behaviour) closes without eroding the faces."""
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[0:5, 0:5, 0:5] = 1  # touches three faces of the array
    lab[2, 2, 2] = 0  # a one-voxel hole
    out = postprocess(lab, _plans(1, num_classes=2))
    assert out[2, 2, 2] == 1 and out[1:5, 1:5, 1:5].min() == 1
    assert out[0].max() == 0 and out[:, 0].max() == 0 and out[:, :, 0].max() == 0
    assert (out == 1).sum() == 4**3
    kept = postprocess(lab, _plans(1, num_classes=2), closing_border="keep")
    assert kept[0:5, 0:5, 0:5].min() == 1 and (kept == 1).sum() == 125


def test_components_are_18_connected() -> None:
    """Two blobs that touch only at a corner are two components (18-connectivity, as the original):
    keep-1 keeps only the larger; with 26-connectivity both would stay."""
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:4, 1:4, 1:4] = 1  # 27 voxels, corner (3, 3, 3)
    lab[4:6, 4:6, 4:6] = 1  # 8 voxels, corner (4, 4, 4): touches the first at a corner only
    out = postprocess(lab, _plans(1, num_classes=2))
    assert (out == 1).sum() == 27 and out[4:6, 4:6, 4:6].max() == 0
    # along an edge they are one component (18-connectivity includes edges)
    lab2 = np.zeros((12, 12, 12), np.uint8)
    lab2[1:4, 1:4, 1:4] = 1
    lab2[4:6, 4:6, 1:4] = 1  # shares the edge (3, 3, z) with the first block
    assert (postprocess(lab2, _plans(1, num_classes=2)) == 1).sum() >= 27 + 12


def test_higher_class_wins_where_closings_overlap() -> None:
    """Classes are written in ascending order over a zero map: where class 1's closing covers a
    voxel predicted as class 2, class 2 stays (as the original)."""
    lab = np.zeros((10, 10, 10), np.uint8)
    lab[2:8, 2:8, 2:8] = 1
    lab[4, 4, 4] = 2  # a class-2 voxel inside class 1: class 1's closing fills it
    out = postprocess(lab, _plans(1))
    assert out[4, 4, 4] == 2 and (out == 1).sum() == 6**3 - 1
    # the reverse: class 1 inside class 2 is overwritten by class 2's closing
    lab = np.where(lab == 1, 2, np.where(lab == 2, 1, 0)).astype(np.uint8)
    out = postprocess(lab, _plans(1))
    assert out[4, 4, 4] == 2 and (out == 1).sum() == 0 and (out == 2).sum() == 6**3


def test_ties_keep_the_component_found_first() -> None:
    """Equal largest components (the original's component step failed there): the first in
    ``scipy.ndimage.label`` order is kept."""
    lab = np.zeros((8, 8, 16), np.uint8)
    lab[2:4, 2:4, 1:4] = 1
    lab[2:4, 2:4, 6:9] = 1
    lab[2:4, 2:4, 11:14] = 1
    out = postprocess(lab, _plans(1, num_classes=2))
    assert (out == 1).sum() == 12 and out[2:4, 2:4, 1:4].min() == 1
    out2 = postprocess(lab, _plans(2, num_classes=2))
    assert (out2 == 1).sum() == 24 and out2[2:4, 2:4, 11:14].max() == 0


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
    # the original masks once, before the closing: a hole of weight 0 filled by the closing stays;
    # weight_mask="before_after" (the previous behaviour) removes it again
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[2:7, 2:7, 2:7] = 1
    weight = np.ones_like(lab)
    weight[4, 4, 4] = 0
    assert postprocess(lab, _plans(1, num_classes=2), weight)[4, 4, 4] == 1
    assert postprocess(lab, _plans(1, num_classes=2), weight, weight_mask="before_after")[4, 4, 4] == 0


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


def test_component_filter_directly() -> None:
    """``keep_largest_components`` on bars of chosen sizes: keep 0 keeps everything (as a new array), keep
    2 keeps the second only when it is MORE than a tenth of the first (120 vs 12: dropped; 120 vs 13:
    kept)."""
    from inference.postprocess import keep_largest_components

    mask = np.zeros((3, 5, 130), bool)
    mask[1, 1, 0:120] = True  # 120 voxels
    mask[1, 3, 0:12] = True  # 12 voxels: exactly a tenth, not more
    mask[1, 3, 20:21] = True  # 1 voxel
    every = keep_largest_components(mask, 0)
    np.testing.assert_array_equal(every, mask)
    assert every is not mask and not np.shares_memory(every, mask)
    one = keep_largest_components(mask, 1)
    assert one.sum() == 120 and one[1, 1, 0:120].all()
    two = keep_largest_components(mask, 2)
    assert two.sum() == 120 and not two[1, 3].any()
    mask[1, 3, 12] = True  # 13 voxels: more than a tenth
    two = keep_largest_components(mask, 2)
    assert two.sum() == 133 and two[1, 3, 0:13].all() and not two[1, 3, 20]


def test_keep_components_zero_keeps_every_component() -> None:
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[1:5, 1:5, 1:5] = 1
    lab[8:10, 8:10, 8:10] = 1
    lab[1:3, 8:10, 8:10] = 1
    out = postprocess(lab, _plans(0, num_classes=2))
    np.testing.assert_array_equal(out, lab)


def test_plans_defaults() -> None:
    """Without ``num_classes`` every label up to the maximum is a class; without ``keep_components``
    the largest component of each class is kept; without ``tumour_classes`` none is copied as is."""
    lab = np.zeros((14, 14, 14), np.uint8)
    lab[1:5, 1:5, 1:5] = 1
    lab[8:11, 8:11, 8:11] = 1  # 27 > 64 / 10: kept by keep_components=2, not by the default 1
    lab[1:4, 9:12, 1:4] = 2
    lab[10:12, 1:3, 10:12] = 2  # 8 voxels, the smaller class-2 component
    out = postprocess(lab, {})
    assert (out == 1).sum() == 64 and out[8:11, 8:11, 8:11].max() == 0
    assert (out == 2).sum() == 27 and out[10:12, 1:3, 10:12].max() == 0


def test_a_tumour_class_below_other_classes() -> None:
    """A tumour class copied as is does not end the loop: the classes above it are still processed."""
    lab = np.zeros((14, 14, 14), np.uint8)
    lab[1:3, 1:3, 1:3] = 1  # tumour: two lesions, both kept
    lab[10:12, 10:12, 10:12] = 1
    lab[5:9, 5:9, 5:9] = 2  # organ: largest component only
    lab[1:3, 10:12, 1:3] = 2
    out = postprocess(lab, _plans(1, tumour=[1]))
    assert (out == 1).sum() == 16
    assert (out == 2).sum() == 64 and out[1:3, 10:12, 1:3].max() == 0


def test_keep_border_closes_like_the_whole_grid_away_from_its_faces() -> None:
    """Away from the grid's faces both borders give SciPy's closing of the whole grid (the box is only
    a shortcut): in particular ``"keep"`` pads the box with background, so a face of the box that lies
    far from the mask stays empty."""
    from scipy import ndimage

    from inference.postprocess import STRUCTURE_18

    lab = np.zeros((16, 16, 16), np.uint8)
    lab[4:12, 4:12, 6:9] = 1  # a slab
    lab[3, 7, 7] = 1  # one voxel that moves the box's face z = 3 away from the slab
    lab[7, 7, 7] = 0  # a hole
    lab[9:11, 4:12, 9:11] = 1  # an L-shaped part: the concave corner is filled
    want = ndimage.binary_closing(lab == 1, structure=STRUCTURE_18)
    for border in ("erode", "keep"):
        out = postprocess(lab, _plans(0, num_classes=2), closing_border=border)
        np.testing.assert_array_equal(out == 1, want, err_msg=border)
