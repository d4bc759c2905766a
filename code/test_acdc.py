"""Evaluate an ACDC model (2D U-Net) on a list of volumes, slice by slice (docs/PROTOCOL.md).

    python code/test_acdc.py --run model/ACDC_CrossMatch_7_labeled --list val.list
    python code/test_acdc.py --ckpt path/to/iter_30000.pth --root_path data/ACDC --list test.list

Each slice is zoomed to the patch (nearest), predicted, and the argmax zoomed back (nearest); Dice, Jaccard,
95HD and ASD per class (RV, Myo, LV) on the 3D stack, averaged over the classes. Prints a line per volume and
class and the means; writes metrics.csv, summary.json and png/<volume>.png into eval_<list>/ in the run folder (or --out).
"""
import time

from utils.data import load_case
from utils.evaluation import (Table, case_note, eval_parser, predict_slices, prepare, protocol, report, run_evaluation,
                              save_nii, save_overlay_png)
from utils.metrics import METRICS, multiclass_metrics, summarize_multiclass

CLASS_NAMES = {1: "RV", 2: "Myo", 3: "LV"}


def parse_args(argv=None):
    p = eval_parser(__doc__.split("\n\n")[0], n_dims=2)
    p.add_argument("--batch_slices", type=int, default=16, help="slices per forward pass")
    args = p.parse_args(argv)
    if args.batch_slices < 1:
        p.error("--batch_slices must be at least 1")
    return args


def evaluate(args) -> dict:
    s = prepare(args, "acdc")
    table = Table(max(map(len, s.cases)) + 4)
    print(f"checkpoint {s.checkpoint} (iteration {s.iteration}), {len(s.cases)} volumes from {s.list_path}, "
          f"device {s.device}, slices zoomed to {s.patch_size}")
    print(table.header())
    rows, volumes, start = [], [], time.perf_counter()
    for name in s.cases:
        image, label = load_case("acdc", s.root, name)
        pred = predict_slices(s.model, image, s.patch_size, s.device, args.batch_slices, s.amp)
        per_class = multiclass_metrics(pred, label, CLASS_NAMES, empty_distance=args.empty_distance)
        volumes.append(per_class)
        for c, cname in CLASS_NAMES.items():
            rows.append({"case": name, "class": cname, **per_class[c]})
            print(table.line(f"{name} {cname}", per_class[c], case_note(per_class[c])), flush=True)
        if args.png:
            save_overlay_png(s.out_dir / "png" / f"{name}.png", image, label, pred, axis=0)
        if args.save_nii:
            save_nii(s.out_dir / "predictions", name, image, label, pred)
    summary = {**summarize_multiclass(volumes, CLASS_NAMES, args.empty_distance), **protocol(s, args),
               "batch_slices": args.batch_slices, "seconds": round(time.perf_counter() - start, 1)}
    return report(table, s.out_dir, rows, ["case", "class", *METRICS, "empty_pred", "empty_label", "both_empty"],
                  summary)


def main(argv=None) -> dict:
    return run_evaluation(evaluate, parse_args(argv))


if __name__ == "__main__":
    main()
