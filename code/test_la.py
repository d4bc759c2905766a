"""Evaluate a 3D model (V-Net: LA, BraTS2019, Pancreas-CT, your own data) on a case list with sliding-window
inference (docs/PROTOCOL.md, docs/DATASETS.md).

    python code/test_la.py --run model/LA_CrossMatch_8_labeled                 # its final checkpoint on test.list
    python code/test_la.py --ckpt path/to/iter_9000.pth --root_path data/LA --list test.list
    python code/test_la.py --run model/BraTS2019_CrossMatch_25_labeled        # test.txt, stride 64 / 64

The data set (case files, classes, test list, stride) is the checkpoint's unless --dataset names another.

Prints a line per case and the mean and std; writes metrics.csv, summary.json and png/<case>.png into eval_<list>/ in
the run folder (or --out). No post-processing unless --lcc.
"""
import time

import numpy as np

from utils.data import load_case
from utils.datasets import add_dataset_flags
from utils.evaluation import (Table, case_note, eval_parser, largest_connected_component, prepare, protocol, report,
                              run_evaluation, save_nii, save_overlay_png, sliding_window)
from utils.metrics import METRICS, binary_metrics, multiclass_metrics, summarize, summarize_multiclass


def parse_args(argv=None):
    p = eval_parser(__doc__.split("\n\n")[0], n_dims=3)
    p.add_argument("--stride_xy", type=int, help="window stride on the first two axes (default: the data set's, LA 18)")
    p.add_argument("--stride_z", type=int, help="window stride on the third axis (default: the data set's, LA 4)")
    p.add_argument("--sw_batch", type=int, default=1, help="windows per forward pass")
    p.add_argument("--lcc", action="store_true", help="keep only the largest connected component (off by default)")
    add_dataset_flags(p, test=True)
    args = p.parse_args(argv)
    if min(args.stride_xy or 1, args.stride_z or 1, args.sw_batch) < 1:
        p.error("--stride_xy, --stride_z and --sw_batch must be at least 1")
    return args


def evaluate(args) -> dict:
    s = prepare(args, "la")
    desc = s.description
    stride_xy, stride_z = args.stride_xy or desc["stride_xy"], args.stride_z or desc["stride_z"]
    classes = {c: name for c, name in enumerate(desc["classes"]) if c > 0}  # more than one: metrics per class
    table = Table(max(map(len, s.cases)) + (max(map(len, classes.values())) + 1 if len(classes) > 1 else 0))
    print(f"checkpoint {s.checkpoint} (iteration {s.iteration}), data set {desc['name']}, {len(s.cases)} cases from "
          f"{s.list_path}, device {s.device}, patch {s.patch_size}, stride {stride_xy}/{stride_z}, lcc "
          f"{'on' if args.lcc else 'off'}")
    print(table.header())
    rows, volumes, start = [], [], time.perf_counter()
    for case in s.cases:
        image, label = load_case("la", s.root, case, s.layout)
        _, pred = sliding_window(s.model, image, s.patch_size, stride_xy, stride_z, s.device, args.sw_batch, s.amp)
        if args.lcc:  # per class, as the background is not a component
            pred = sum(c * largest_connected_component(pred == c) for c in classes).astype(np.uint8)
        if len(classes) == 1:
            m = binary_metrics(pred == 1, label != 0, empty_distance=args.empty_distance)
            rows.append({"case": case, **m})
            print(table.line(case, m, case_note(m)), flush=True)
        else:
            per_class = multiclass_metrics(pred, label, classes, empty_distance=args.empty_distance)
            volumes.append(per_class)
            for c, name in classes.items():
                rows.append({"case": case, "class": name, **per_class[c]})
                print(table.line(f"{case} {name}", per_class[c], case_note(per_class[c])), flush=True)
        if args.png:
            save_overlay_png(s.out_dir / "png" / f"{case}.png", image, label, pred, axis=2)
        if args.save_nii:
            save_nii(s.out_dir / "predictions", case, image, label, pred)
    scores = summarize_multiclass(volumes, classes, args.empty_distance) if volumes else summarize(rows,
                                                                                                   args.empty_distance)
    summary = {**scores, **protocol(s, args), "dataset": desc["name"], "case_file": desc["case_file"],
               "lcc": args.lcc, "stride_xy": stride_xy, "stride_z": stride_z, "sw_batch": args.sw_batch,
               "seconds": round(time.perf_counter() - start, 1)}
    columns = ["case", *(["class"] if volumes else []), *METRICS, "empty_pred", "empty_label", "both_empty"]
    return report(table, s.out_dir, rows, columns, summary)


def main(argv=None) -> dict:
    return run_evaluation(evaluate, parse_args(argv))


if __name__ == "__main__":
    main()
