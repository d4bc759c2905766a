"""Metrics against known geometry, the empty-case policy (docs/PROTOCOL.md) and the summaries."""
import math

import numpy as np
import pytest

from utils.metrics import binary_metrics, multiclass_metrics, summarize, summarize_multiclass


def cube(lo, hi, shape=(30, 30, 30)):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
    return m


def test_shifted_cubes():
    # two 12^3 cubes, the prediction shifted by 3 voxels along x: overlap 9 x 12 x 12
    label = cube((5, 5, 5), (17, 17, 17))
    pred = cube((8, 5, 5), (20, 17, 17))
    m = binary_metrics(pred, label)
    assert m["dice"] == pytest.approx(9 / 12)  # 2 * 9*144 / (2 * 12*144)
    assert m["jaccard"] == pytest.approx(9 / 15)  # 9*144 / (15*144)
    # every surface distance is at most the shift, and the faces across the shift (> 5 % of the surface) are at it
    assert m["hd95"] == pytest.approx(3.0)
    assert not (m["empty_pred"] or m["empty_label"] or m["both_empty"])
    # spacing 2 along the shifted axis doubles the distance, leaves the overlap measures alone
    ms = binary_metrics(pred, label, spacing=(2.0, 1.0, 1.0))
    assert ms["hd95"] == pytest.approx(6.0) and ms["dice"] == pytest.approx(9 / 12)


def test_nested_cubes_asd():
    # prediction 16^3 centred in a 20^3 label: every prediction surface voxel is 2 from the label surface
    label = cube((4, 4, 4), (24, 24, 24))
    pred = cube((6, 6, 6), (22, 22, 22))
    m = binary_metrics(pred, label)
    assert m["asd"] == pytest.approx(2.0)  # medpy asd(pred, label) is directed: pred surface -> label surface
    assert m["dice"] == pytest.approx(2 * 16 ** 3 / (16 ** 3 + 20 ** 3))
    assert m["jaccard"] == pytest.approx(16 ** 3 / 20 ** 3)


def test_perfect_prediction():
    label = cube((5, 5, 5), (17, 17, 17))
    m = binary_metrics(label, label)
    assert (m["dice"], m["jaccard"], m["hd95"], m["asd"]) == (1.0, 1.0, 0.0, 0.0)


def test_empty_prediction():
    label = cube((5, 5, 5), (17, 17, 17))
    m = binary_metrics(np.zeros_like(label), label)
    assert (m["dice"], m["jaccard"]) == (0.0, 0.0)
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
    assert m["empty_pred"] and not m["empty_label"] and not m["both_empty"]
    z = binary_metrics(np.zeros_like(label), label, empty_distance="zero")
    assert (z["dice"], z["jaccard"], z["hd95"], z["asd"]) == (0.0, 0.0, 0.0, 0.0)
    assert z["empty_pred"]


def test_empty_label():
    pred = cube((5, 5, 5), (17, 17, 17))
    for option in ("nan", "zero"):  # 'zero' concerns empty predictions only
        m = binary_metrics(pred, np.zeros_like(pred), empty_distance=option)
        assert (m["dice"], m["jaccard"]) == (0.0, 0.0)
        assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
        assert m["empty_label"] and not m["empty_pred"] and not m["both_empty"]


def test_both_empty():
    empty = np.zeros((8, 8, 8), dtype=np.uint8)
    m = binary_metrics(empty, empty)
    assert (m["dice"], m["jaccard"], m["hd95"], m["asd"]) == (1.0, 1.0, 0.0, 0.0)
    assert m["both_empty"] and not m["empty_pred"] and not m["empty_label"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="empty_distance"):
        binary_metrics(np.zeros((4, 4)), np.zeros((4, 4)), empty_distance="skip")


def test_multiclass():
    label = np.zeros((20, 20, 20), dtype=np.uint8)
    label[2:8, 2:8, 2:8] = 1
    label[10:16, 10:16, 10:16] = 2
    pred = label.copy()
    pred[pred == 2] = 0  # class 2 missing from the prediction
    pred[0:2, 0:2, 0:2] = 3  # class 3 missing from the label
    out = multiclass_metrics(pred, label, classes=(1, 2, 3))
    assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0
    assert out[2]["empty_pred"] and out[2]["dice"] == 0.0 and math.isnan(out[2]["hd95"])
    assert out[3]["empty_label"] and out[3]["dice"] == 0.0 and math.isnan(out[3]["asd"])


def test_summarize_excludes_undefined_distances():
    label = cube((5, 5, 5), (17, 17, 17))
    cases = [binary_metrics(cube((8, 5, 5), (20, 17, 17)), label),  # dice .75, hd95 3
             binary_metrics(label, label),  # dice 1, hd95 0
             binary_metrics(np.zeros_like(label), label),  # empty prediction
             binary_metrics(label, np.zeros_like(label)),  # empty label
             binary_metrics(np.zeros_like(label), np.zeros_like(label))]  # both empty: dice 1, hd95 0
    s = summarize(cases)
    assert s["dice"] == pytest.approx((0.75 + 1 + 0 + 0 + 1) / 5)
    assert s["dice_std"] == pytest.approx(np.std([0.75, 1, 0, 0, 1]))
    assert s["hd95"] == pytest.approx(1.0)  # (3 + 0 + 0) / 3: the two undefined cases are left out
    assert s["hd95_std"] == pytest.approx(np.std([3, 0, 0]))
    assert (s["n_cases"], s["n_empty"], s["n_empty_label"], s["n_both_empty"]) == (5, 1, 1, 1)
    assert s["n_distance"] == 3
    assert "mean over 3 of 5 cases" in s["distance_policy"] and "1 empty predictions left out" in s["distance_policy"]
    # the lineage's option scores the empty prediction 0 and says so
    z = summarize([binary_metrics(np.zeros_like(label), label, empty_distance="zero"), *cases[:2]], "zero")
    assert z["hd95"] == pytest.approx(1.0) and z["n_empty"] == 1
    assert z["n_distance"] == 3 and "1 empty predictions scored 0" in z["distance_policy"]


def test_summarize_all_undefined_is_nan():
    label = cube((5, 5, 5), (17, 17, 17))
    s = summarize([binary_metrics(np.zeros_like(label), label)])
    assert s["dice"] == 0.0 and math.isnan(s["hd95"]) and math.isnan(s["asd_std"])


def test_summarize_multiclass_means_of_class_means():
    a, b = cube((2, 2, 2), (8, 8, 8), (20, 20, 20)), cube((4, 2, 2), (10, 8, 8), (20, 20, 20))
    label = a + 2 * cube((10, 10, 10), (16, 16, 16), (20, 20, 20))
    vol1 = multiclass_metrics(label, label, classes=(1, 2))  # perfect
    vol2 = multiclass_metrics(b, label, classes=(1, 2))  # class 1 shifted by 2 (dice 4/6), class 2 empty prediction
    s = summarize_multiclass([vol1, vol2], {1: "A", 2: "B"})
    assert s["per_class"]["A"]["dice"] == pytest.approx((1 + 4 / 6) / 2)
    assert s["per_class"]["B"]["dice"] == pytest.approx(0.5)
    assert s["dice"] == pytest.approx(((1 + 4 / 6) / 2 + 0.5) / 2)
    assert s["per_class"]["B"]["hd95"] == 0.0  # only the defined volume counts
    assert s["hd95"] == pytest.approx((s["per_class"]["A"]["hd95"] + 0.0) / 2)
    # std over volumes of the per-volume class averages: vol1 1.0, vol2 (4/6 + 0) / 2
    assert s["dice_std"] == pytest.approx(np.std([1.0, (4 / 6) / 2]))
    assert (s["n_cases"], s["n_empty"], s["n_empty_label"], s["n_both_empty"]) == (2, 1, 0, 0)
    assert "(A 2, B 1 of 2)" in s["distance_policy"]
