"""Check an LA or ACDC data root: every case of its lists read and checked as training and testing do.

    python code/check_data.py --task la   --root_path data/LA
    python code/check_data.py --task acdc --root_path data/ACDC --list train_slices.list val.list

Without --list, every standard list present is checked (LA train.list, test.list; ACDC train_slices.list,
val.list, test.list). ACDC slices are also compared with the volume they come from (slice k = volume[k - 1]), as
training does.
Exit 0 and a summary per list, or exit 1 with one line naming the first bad file.
What no check can see: data that is wrong but plausible (a zeroed half of a volume, a label shifted by a few
voxels).
"""
import sys
import time

import numpy as np

from utils import resolve
from utils.data import DataError, check_acdc_slice, find_list, load_case, read_list
from utils.flags import ArgumentParser

LISTS = {"la": ["train.list", "test.list"], "acdc": ["train_slices.list", "val.list", "test.list"]}


def check_list(task: str, root, list_name: str) -> dict:
    """Read and check every case of one list; returns counts, shapes, intensity range and class fractions."""
    names = read_list(find_list(root, list_name))
    shapes, lo, hi, counts = [], np.inf, -np.inf, 0
    volumes = {}
    for name in names:
        image, label = load_case(task, root, name)
        if "_slice_" in name:
            check_acdc_slice(root, name, image, label, volumes)
        shapes.append(image.shape)
        lo, hi = min(lo, float(image.min())), max(hi, float(image.max()))
        counts = counts + np.bincount(label.ravel().astype(np.intp), minlength=2 if task == "la" else 4)
    return {"list": list_name, "cases": len(names), "shape_min": np.min(shapes, 0).tolist(),
            "shape_max": np.max(shapes, 0).tolist(), "intensity": (lo, hi), "class_fractions": counts / counts.sum()}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["la", "acdc"], required=True)
    p.add_argument("--root_path", help="data root (default data/LA or data/ACDC)")
    p.add_argument("--list", nargs="+", help="list names in the root, or paths (default: the standard lists present)")
    args = p.parse_args(argv)
    root = resolve(args.root_path or f"data/{args.task.upper()}")
    lists = args.list or [n for n in LISTS[args.task] if (root / n).is_file()] or LISTS[args.task][:1]
    t0 = time.perf_counter()
    try:
        infos = [check_list(args.task, root, name) for name in lists]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.task.upper()} root {root}: {len(lists)} list(s) OK in {time.perf_counter() - t0:.1f} s")
    for i in infos:
        print(f"{i['list']:<18} {i['cases']:>5} cases  shape {'x'.join(map(str, i['shape_min']))} .. "
              f"{'x'.join(map(str, i['shape_max']))}  intensity {i['intensity'][0]:.3g} .. {i['intensity'][1]:.3g}  "
              f"class fractions {' '.join(f'{f:.4f}' for f in i['class_fractions'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
