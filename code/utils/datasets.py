"""The 3D data sets as data: one description file each in code/datasets/ (la.json, brats2019.json, pancreas.json,
custom.json), read here, and the flags that choose one (``--dataset``) for train_la.py, train_la_cml.py, test_la.py
and check_data.py (docs/DATASETS.md).

A description names where a case's h5 file lies inside the data root (``case_file``, ``{case}`` = a list entry),
the lists, the classes, the patch, the evaluation stride, the labeled splits the literature reports, a note on the
intensities and, per fact, the public repository and file it was read from. ``--dataset`` takes a name or the path
of a description file of the same form; ``custom`` takes the layout from ``--root_path``, ``--case_file`` and
``--n_classes``. LA is the default and resolves to exactly the settings the scripts had before data sets existed.
"""
import json
from pathlib import Path

from utils import resolve
from utils.data import DataError, Layout

DESCRIPTIONS = Path(__file__).resolve().parents[1] / "datasets"
NAMES = ("la", "brats2019", "pancreas", "custom")
FIELDS = {"name": str, "title": str, "run_prefix": (str, type(None)), "root_path": (str, type(None)),
          "case_file": (str, type(None)), "train_list": str, "test_list": str, "val_list": (str, type(None)),
          "classes": (list, type(None)), "float_labels": bool, "patch_size": list, "stride_xy": int, "stride_z": int,
          "labelnum": (int, type(None)), "splits": list, "intensity": str, "sources": dict}
# what a checkpoint written before --dataset existed was trained on (LA): --resume and reproduce.py compare with it
PRE_DATASET_ARGS = {"dataset": "la", "case_file": "2018LA_Seg_Training Set/{case}/mri_norm2.h5", "n_classes": 2,
                    "float_labels": False}


def description_path(dataset: str) -> Path:
    """The file of ``--dataset``: a name of NAMES, or the path of a description file."""
    return DESCRIPTIONS / f"{dataset}.json" if dataset in NAMES else resolve(dataset)


def load_description(dataset: str) -> dict:
    """The description of ``--dataset``, checked field by field (DataError naming the file and the field)."""
    path = description_path(dataset)
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"--dataset {dataset}: description {path} cannot be read ({e.strerror}); expected one of "
                        f"{', '.join(NAMES)} or a description file") from None
    except ValueError as e:
        raise DataError(f"description {path}: not JSON ({e})") from None
    if not isinstance(desc, dict):
        raise DataError(f"description {path}: expected a JSON object with the fields {', '.join(FIELDS)}")
    for key, kind in FIELDS.items():
        if key not in desc:
            raise DataError(f"description {path}: no field {key!r} (expected {', '.join(FIELDS)})")
        if not isinstance(desc[key], kind) or (kind is int and isinstance(desc[key], bool)):
            raise DataError(f"description {path}: field {key!r} is {desc[key]!r}, expected {_kind_name(kind)}")
    if desc["case_file"] is not None and "{case}" not in desc["case_file"]:
        raise DataError(f"description {path}: case_file {desc['case_file']!r} has no {{case}} (where a list entry goes)")
    if desc["classes"] is not None and len(desc["classes"]) < 2:
        raise DataError(f"description {path}: classes {desc['classes']}, expected at least two (background first)")
    if len(desc["patch_size"]) != 3 or min(desc["stride_xy"], desc["stride_z"]) < 1:
        raise DataError(f"description {path}: patch_size {desc['patch_size']} and strides {desc['stride_xy']}/"
                        f"{desc['stride_z']}, expected three patch sides and positive strides")
    return {**desc, "file": str(path)}


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else {"str": "a string", "int": "an integer", "bool": "true/false",
                                                        "list": "a list", "dict": "an object"}[k.__name__] for k in kinds)


def add_dataset_flags(p, test: bool = False) -> None:
    """``--dataset`` and, for a user's own data, ``--case_file`` and ``--n_classes`` (3D scripts only)."""
    g = p.add_argument_group("data set (docs/DATASETS.md)")
    g.add_argument("--dataset", default=None if test else "la",
                   help="la (default" + (": the checkpoint's" if test else "") + "), brats2019, pancreas, custom, or "
                        "the path of a description file like code/datasets/la.json")
    g.add_argument("--case_file", help="where a case lies inside the root, {case} = a list entry, e.g. "
                                       "'data/{case}.h5' (custom: required; else the description's)")
    g.add_argument("--n_classes", type=int, help="classes including background (custom: required; else the "
                                                 "description's)")


def resolve_dataset(args, flags: tuple = ("root_path", "train_list", "patch_size", "labelnum")) -> None:
    """Fill ``args.case_file``, ``args.n_classes``, ``args.float_labels`` and every flag of ``flags`` left unset from
    the description of ``args.dataset`` (``custom``: from the flags, which it requires); a description file is
    recorded by its absolute path. DataError on a bad description or a missing custom flag. Running it twice
    changes nothing."""
    desc = load_description(args.dataset)
    if args.dataset not in NAMES:
        args.dataset = desc["file"]
    if args.dataset == "custom":
        missing = [f"--{f}" for f in ("root_path", "case_file", "n_classes") if getattr(args, f, None) is None]
        if missing:
            raise DataError(f"--dataset custom: {', '.join(missing)} required (the layout of your own data, "
                            f"docs/DATASETS.md)")
    args.case_file = args.case_file or desc["case_file"]
    if "{case}" not in args.case_file:
        raise DataError(f"--case_file {args.case_file}: expected a path with {{case}} where a list entry goes")
    args.n_classes = args.n_classes or (len(desc["classes"]) if desc["classes"] else None)
    if args.n_classes is None:
        raise DataError(f"description {desc['file']}: no classes; pass --n_classes")
    if args.n_classes < 2:
        raise DataError(f"--n_classes {args.n_classes}: expected at least 2 (background and one class)")
    args.float_labels = desc["float_labels"]
    for flag in flags:
        if getattr(args, flag, None) is None:
            setattr(args, flag, desc[flag])
    if "labelnum" in flags and args.labelnum is None:
        raise DataError("--dataset custom: --labelnum required (the first N cases of the training list are labeled)")


def description_of(args) -> dict:
    """The description of a 3D run's resolved flags (a namespace, or a checkpoint's saved dict), with what the flags
    decided filled in: case file, classes (named ``class <c>`` where the description names none), data root and the
    run folder's prefix. None for ACDC."""
    values = args if isinstance(args, dict) else vars(args)
    if values.get("task") != "la":
        return None
    values = {**PRE_DATASET_ARGS, **values}
    desc = load_description(values["dataset"])
    n = values["n_classes"]
    classes = desc["classes"] if desc["classes"] and len(desc["classes"]) == n else [
        "background", *(f"class {c}" for c in range(1, n))]
    root = values.get("root_path") or desc["root_path"]
    return {**desc, "case_file": values["case_file"], "classes": classes, "root_path": root,
            "run_prefix": desc["run_prefix"] or Path(root).name}


def description_entry(args) -> dict:
    """``{"dataset_description": ...}`` for --print_config and config.json of a 3D run; ``{}`` for ACDC."""
    desc = description_of(args)
    return {"dataset_description": desc} if desc else {}


def layout_of(args):
    """The Layout of a 3D run's resolved flags (or of a checkpoint's saved ones, a dict); None for ACDC."""
    values = args if isinstance(args, dict) else vars(args)
    if values.get("task") != "la":
        return None
    values = {**PRE_DATASET_ARGS, **values}
    return Layout(values["case_file"], values["n_classes"], values["float_labels"])


def run_prefix(args) -> str:
    """The first part of a run folder's name: the description's (LA, BraTS2019, Pancreas_CT; custom: the data
    root's folder name), or the task's (ACDC)."""
    desc = description_of(args)
    return desc["run_prefix"] if desc else args.task.upper()


def saved_args(saved: dict) -> dict:
    """A checkpoint's or config.json's training flags, those of a 3D run from before --dataset filled in (LA)."""
    return {**PRE_DATASET_ARGS, **saved} if saved.get("task") == "la" else saved
