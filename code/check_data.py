"""Check a data root (LA, ACDC, BraTS2019, Pancreas-CT, your own 3D data): every case of its lists read and checked
as training and testing do.

    python code/check_data.py --task la   --root_path data/LA
    python code/check_data.py --task acdc --root_path data/ACDC --list train_slices.list val.list
    python code/check_data.py --dataset brats2019 --root_path data/BraTS2019
    python code/check_data.py --dataset custom --root_path data/mine --case_file 'data/{case}.h5' --n_classes 3

Without --list, every standard list present is checked (3D: the data set's training, validation and test lists,
LA train.list, test.list; ACDC train_slices.list, val.list, test.list). ACDC slices are also compared with the
volume they come from (slice k = volume[k - 1]), as training does.
Exit 0 and a summary per list, or exit 1 with one line naming the first bad file.
What no check can see: data that is wrong but plausible (a zeroed half of a volume, a label shifted by a few
voxels).
"""
import sys
import time

import numpy as np

from utils import resolve
from utils.data import LA_LAYOUT, N_CLASSES, DataError, check_acdc_slice, find_list, load_case, read_list
from utils.datasets import add_dataset_flags, description_of, layout_of, resolve_dataset
from utils.flags import ArgumentParser

LISTS = {"acdc": ["train_slices.list", "val.list", "test.list"]}


def check_list(task: str, root, list_name: str, layout=None) -> dict:
    """Read and check every case of one list (3D: of ``layout``, default LA's); returns counts, shapes, intensity
    range and class fractions."""
    names = read_list(find_list(root, list_name))
    n_classes = (layout or LA_LAYOUT).n_classes if task == "la" else N_CLASSES[task]
    shapes, lo, hi, counts = [], np.inf, -np.inf, 0
    volumes = {}
    for name in names:
        image, label = load_case(task, root, name, layout)
        if "_slice_" in name:
            check_acdc_slice(root, name, image, label, volumes)
        shapes.append(image.shape)
        lo, hi = min(lo, float(image.min())), max(hi, float(image.max()))
        counts = counts + np.bincount(label.ravel().astype(np.intp), minlength=n_classes)
    return {"list": list_name, "cases": len(names), "shape_min": np.min(shapes, 0).tolist(),
            "shape_max": np.max(shapes, 0).tolist(), "intensity": (lo, hi), "class_fractions": counts / counts.sum()}


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=["la", "acdc"], help="la: a 3D data set (--dataset, default la); acdc")
    p.add_argument("--root_path", help="data root (default the data set's: data/LA, data/ACDC, data/BraTS2019, ...)")
    p.add_argument("--list", nargs="+", help="list names in the root, or paths (default: the standard lists present)")
    add_dataset_flags(p, test=True)
    args = p.parse_args(argv)
    if args.task is None and args.dataset is None:
        p.error("--task la|acdc or --dataset required")
    if args.task == "acdc" and (args.dataset or args.case_file or args.n_classes):
        p.error("--dataset, --case_file, --n_classes: 3D data sets only (ACDC has one layout)")
    args.task, layout, title = args.task or "la", None, "ACDC"
    try:
        if args.task == "la":
            args.dataset = args.dataset or "la"
            resolve_dataset(args, flags=("root_path",))
            desc, layout = description_of(args), layout_of(args)
            title, standard = desc["run_prefix"], [desc["train_list"], desc["val_list"], desc["test_list"]]
        root = resolve(args.root_path or "data/ACDC")
        standard = LISTS["acdc"] if args.task == "acdc" else [n for n in standard if n]
        lists = args.list or [n for n in standard if (root / n).is_file()] or standard[:1]
        t0 = time.perf_counter()
        infos = [check_list(args.task, root, list_name, layout) for list_name in lists]
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{title} root {root}: {len(lists)} list(s) OK in {time.perf_counter() - t0:.1f} s")
    for i in infos:
        print(f"{i['list']:<18} {i['cases']:>5} cases  shape {'x'.join(map(str, i['shape_min']))} .. "
              f"{'x'.join(map(str, i['shape_max']))}  intensity {i['intensity'][0]:.3g} .. {i['intensity'][1]:.3g}  "
              f"class fractions {' '.join(f'{f:.4f}' for f in i['class_fractions'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
