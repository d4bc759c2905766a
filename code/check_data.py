"""Check an LA or ACDC data root and print a summary table.

    python code/check_data.py --task la   --root_path data/LA
    python code/check_data.py --task acdc --root_path data/ACDC --list train_slices.list val.list

Without ``--list`` the task's training list is checked together with every other standard list present
(LA: train.list, test.list; ACDC: train_slices.list, train.list, val.list, test.list). Exit code 0 when
everything is fine, 1 with a one-line ``error: ...`` message on the first problem found.
"""
from __future__ import annotations

import sys
import time

from utils.checks import DataError, check_acdc_root, check_la_root
from utils.paths import resolve
from utils.run import ArgumentParser

DEFAULT_ROOT = {"la": "data/LA", "acdc": "data/ACDC"}
REQUIRED_LIST = {"la": "train.list", "acdc": "train_slices.list"}
OPTIONAL_LISTS = {"la": ["test.list"], "acdc": ["train.list", "val.list", "test.list"]}
CLASS_NAMES = {"la": ["bg", "LA"], "acdc": ["bg", "RV", "Myo", "LV"]}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["la", "acdc"], required=True)
    p.add_argument("--root_path", default=None,
                   help="data root (default data/LA or data/ACDC; relative paths are taken from the repo root)")
    p.add_argument("--list", nargs="+", default=None,
                   help="list file names (in the root) or paths; default: the standard lists present")
    p.add_argument("--labelnum", type=int, default=None,
                   help="labeled cases (LA) / labeled patients (ACDC) to validate against the first list")
    p.add_argument("--patch_size", type=int, nargs="+", default=None,
                   help="training patch to validate (LA 3 ints, ACDC 2 ints)")
    p.add_argument("--limit", type=int, default=None,
                   help="read the arrays of only the first N entries of each list (metadata of all)")
    return p.parse_args(argv)


def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def format_table(task: str, infos: list[dict]) -> str:
    names = CLASS_NAMES[task]
    head = ["list", "kind", "cases", "read", "shape min", "shape max", "intensity min..max",
            "mean min..max", "class fractions (" + "/".join(names) + ")", "no fg"]
    rows = []
    for info in infos:
        fr = info.get("class_fractions")
        rows.append([
            info["list_name"], info["kind"], str(info["n_cases"]), str(info["n_read"]),
            _fmt_shape(info["shape_min"]), _fmt_shape(info["shape_max"]),
            f"{info['intensity_min']:.3g}..{info['intensity_max']:.3g}" if "intensity_min" in info else "-",
            f"{info['mean_min']:.3g}..{info['mean_max']:.3g}" if "mean_min" in info else "-",
            " ".join(f"{f:.4f}" for f in fr) if fr else "-",
            str(info.get("n_without_foreground", "-")),
        ])
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    root = resolve(args.root_path or DEFAULT_ROOT[args.task])
    check = check_la_root if args.task == "la" else check_acdc_root
    if args.list:
        lists = list(args.list)
    else:
        lists = [REQUIRED_LIST[args.task]] + [n for n in OPTIONAL_LISTS[args.task] if (root / n).is_file()]
    infos = []
    t0 = time.perf_counter()
    try:
        for i, name in enumerate(lists):
            # labelnum and patch size are training flags: validate them against the first (training) list
            info = check(root, name, labelnum=args.labelnum if i == 0 else None,
                         patch_size=args.patch_size if i == 0 else None, cases_limit=args.limit)
            info["list_name"] = name
            infos.append(info)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.task.upper()} root {root}: {len(lists)} list(s) OK in {time.perf_counter() - t0:.1f} s")
    print(format_table(args.task, infos))
    first = infos[0]
    if args.labelnum is not None:
        if args.task == "la":
            print(f"--labelnum {args.labelnum}: first {args.labelnum} cases of {lists[0]} labeled, "
                  f"{first['n_cases'] - args.labelnum} unlabeled")
        elif first.get("n_labeled") is not None:
            print(f"--labelnum {args.labelnum}: first {first['n_labeled']} slices of {lists[0]} labeled, "
                  f"{first['n_cases'] - first['n_labeled']} unlabeled")
    for info in infos:
        for w in info["warnings"]:
            print(f"warning: {info['list_name']}: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
