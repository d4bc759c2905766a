"""Per-case segmentation metrics (medpy) and their summary, with an explicit empty-case policy.

Metrics: Dice, Jaccard, 95% Hausdorff distance (HD95) and average surface distance (ASD), computed by
``medpy.metric.binary`` as ``dc(pred, label)``, ``jc(pred, label)``, ``hd95(pred, label)`` and
``asd(pred, label)`` (ASD is directed: the mean distance from the prediction's surface to the label's, as
the lineage computes it). Distances are in voxels unless a voxel ``spacing`` is given.

Empty-case policy (docs/PROTOCOL.md). medpy cannot compute a surface distance to an empty mask (it raises), so it
is never called on one:

================================  =====  =======  ===============  ==============
case                              dice   jaccard  hd95, asd        flag
================================  =====  =======  ===============  ==============
prediction empty, label not       0      0        NaN (undefined)  ``empty_pred``
label empty, prediction not       0      0        NaN (undefined)  ``empty_label``
both empty                        1      1        0                ``both_empty``
================================  =====  =======  ===============  ==============

NaN distances are left out of the distance means (``nanmean``) and the cases are counted, so a summary
says how many cases its HD95/ASD rest on. ``empty_distance='zero'`` scores HD95 and ASD of an *empty
prediction* as 0 instead: the lineage's habit, which flatters the mean, available only on request. It does
not change the other two rows (an empty label has no lineage convention: medpy crashes there).
"""
from typing import Iterable, Optional, Sequence

import numpy as np
from medpy.metric import binary as mb

METRICS = ("dice", "jaccard", "hd95", "asd")
DISTANCES = ("hd95", "asd")
EMPTY_DISTANCE_OPTIONS = ("nan", "zero")


def binary_metrics(pred, label, spacing: Optional[Sequence[float]] = None, empty_distance: str = "nan") -> dict:
    """Metrics of one binary prediction against one binary label (any nonzero value is foreground).

    Returns ``{'dice', 'jaccard', 'hd95', 'asd'}`` as floats plus the booleans ``empty_pred``,
    ``empty_label`` and ``both_empty`` (at most one is true); see the module docstring for the policy."""
    if empty_distance not in EMPTY_DISTANCE_OPTIONS:
        raise ValueError(f"empty_distance {empty_distance!r}: expected one of {EMPTY_DISTANCE_OPTIONS}")
    pred = np.asarray(pred) != 0
    label = np.asarray(label) != 0
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} != label shape {label.shape}")
    has_pred, has_label = bool(pred.any()), bool(label.any())
    flags = dict(empty_pred=has_label and not has_pred, empty_label=has_pred and not has_label,
                 both_empty=not has_pred and not has_label)
    if has_pred and has_label:
        values = dict(dice=mb.dc(pred, label), jaccard=mb.jc(pred, label),
                      hd95=mb.hd95(pred, label, voxelspacing=spacing), asd=mb.asd(pred, label, voxelspacing=spacing))
    elif flags["both_empty"]:
        values = dict(dice=1.0, jaccard=1.0, hd95=0.0, asd=0.0)
    else:
        distance = 0.0 if flags["empty_pred"] and empty_distance == "zero" else float("nan")
        values = dict(dice=0.0, jaccard=0.0, hd95=distance, asd=distance)
    return {**{k: float(v) for k, v in values.items()}, **flags}


def multiclass_metrics(pred, label, classes: Iterable[int] = (1, 2, 3), spacing: Optional[Sequence[float]] = None,
                       empty_distance: str = "nan") -> dict:
    """``binary_metrics`` of ``pred == c`` against ``label == c`` for each class ``c``: ``{c: dict}``."""
    pred, label = np.asarray(pred), np.asarray(label)
    return {c: binary_metrics(pred == c, label == c, spacing, empty_distance) for c in classes}


def _n_with_distance(n_cases: int, n_empty_pred: int, n_empty_label: int, empty_distance: str = "nan") -> int:
    """How many cases the HD95/ASD means rest on."""
    return n_cases - n_empty_label - (n_empty_pred if empty_distance == "nan" else 0)


def _policy_tail(n_empty_pred: int, n_empty_label: int, n_both_empty: int, empty_distance: str = "nan") -> str:
    """What happened to the empty cases, in words."""
    fate = "scored 0 (lineage convention, flatters the mean)" if empty_distance == "zero" else "left out (undefined)"
    return (f"{n_empty_pred} empty predictions {fate}, {n_empty_label} empty labels left out (undefined), "
            f"{n_both_empty} both-empty cases scored 0")


def _nan_stats(values) -> tuple:
    """Mean and population standard deviation of the non-NaN values; (NaN, NaN) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))


def summarize(cases: Sequence[dict], empty_distance: str = "nan") -> dict:
    """Means and (population) standard deviations of ``binary_metrics`` results over cases.

    Dice and Jaccard use every case; HD95/ASD use ``nanmean``/``nanstd`` (NaN = undefined, see the module
    docstring), NaN when no case has a distance. Returns the four means, ``<metric>_std``, ``n_cases``,
    ``n_empty`` (empty predictions), ``n_empty_label``, ``n_both_empty``, ``n_distance`` (cases the distance
    means rest on) and ``distance_policy`` (that in words)."""
    if not cases:
        raise ValueError("summarize: no cases")
    out = {}
    for m in METRICS:
        out[m], out[m + "_std"] = _nan_stats([c[m] for c in cases])
    out.update(n_cases=len(cases), n_empty=sum(c["empty_pred"] for c in cases),
               n_empty_label=sum(c["empty_label"] for c in cases), n_both_empty=sum(c["both_empty"] for c in cases))
    out["n_distance"] = _n_with_distance(out["n_cases"], out["n_empty"], out["n_empty_label"], empty_distance)
    out["distance_policy"] = (f"hd95/asd: mean over {out['n_distance']} of {out['n_cases']} cases; "
                              + _policy_tail(out["n_empty"], out["n_empty_label"], out["n_both_empty"], empty_distance))
    return out


def summarize_multiclass(volumes: Sequence[dict], class_names: dict, empty_distance: str = "nan") -> dict:
    """Summary of ``multiclass_metrics`` results (one ``{class: metrics}`` dict per volume).

    ``per_class[name]`` is ``summarize`` over the volumes for that class. The top-level means are the means
    of the class means (the lineage's ACDC number; NaN if a class has no distance at all); the top-level
    ``<metric>_std`` is the spread over volumes of each volume's class-averaged value (``nanmean`` over the
    classes for distances). Counts are over (volume, class) pairs, except ``n_cases`` = volumes."""
    if not volumes:
        raise ValueError("summarize_multiclass: no volumes")
    per_class = {name: summarize([v[c] for v in volumes], empty_distance) for c, name in class_names.items()}
    out = {}
    for m in METRICS:
        out[m] = float(np.mean([per_class[name][m] for name in class_names.values()]))
        per_volume = [_nan_stats([v[c][m] for c in class_names])[0] for v in volumes]
        out[m + "_std"] = _nan_stats(per_volume)[1]
    out["n_cases"] = len(volumes)
    for key in ("n_empty", "n_empty_label", "n_both_empty"):
        out[key] = sum(s[key] for s in per_class.values())
    used = ", ".join(f"{name} {s['n_distance']}" for name, s in per_class.items())
    out["distance_policy"] = (f"hd95/asd per class: mean over the volumes with a distance ({used} of {len(volumes)}); "
                              + _policy_tail(out["n_empty"], out["n_empty_label"], out["n_both_empty"], empty_distance)
                              + " (counts over volume-class pairs); overall: mean of the class means")
    out["per_class"] = per_class
    return out
