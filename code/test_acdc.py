"""Evaluate an ACDC model (2D U-Net) on a list of volumes, slice by slice (SPEC.md 4).

    python code/test_acdc.py --run model/ACDC_CrossMatch_7_labeled
    python code/test_acdc.py --ckpt path/to/iter_30000.pth --list val.list

Each slice is zoomed to the patch size (nearest), predicted, and the argmax zoomed back (nearest); Dice,
Jaccard, HD95 and ASD are computed per class (RV, Myo, LV) on the 3D stack and averaged over the classes.
Prints one line per volume and class, the per-class and overall mean and std, writes metrics.csv and
summary.json (and png/<volume>.png, with --save_nii predictions/*.nii.gz) into the run folder or --out.
"""
import time

from utils.allocator import use_allocator
from utils.checkpoint import CheckpointError
from utils.checks import DataError
from utils.data_acdc import acdc_volume_path, load_volume
from utils.evaluation import (EvaluationError, Table, add_eval_args, case_note, predict_volume_slices, prepare,
                              save_nii, save_overlay_png, write_results)
from utils.metrics import METRICS, multiclass_metrics, summarize_multiclass
from utils.paths import REPO_ROOT
from utils.run import ArgumentParser, pick_device

CLASS_NAMES = {1: "RV", 2: "Myo", 3: "LV"}
CSV_COLUMNS = ["case", "class", *METRICS, "empty_pred", "empty_label", "both_empty"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_args(p, n_dims=2)
    p.add_argument("--batch_slices", type=int, default=16, help="slices per forward pass")
    args = p.parse_args(argv)
    if args.batch_slices < 1:
        p.error("--batch_slices must be at least 1")
    return args


def evaluate_volume(model, image, label, patch_size, device="cpu", batch_slices=16, amp_dtype=None,
                    empty_distance="nan") -> tuple:
    """``(prediction (D, H, W) uint8, {class: binary_metrics})`` of one volume."""
    pred = predict_volume_slices(model, image, patch_size, device, batch_slices, amp_dtype)
    return pred, multiclass_metrics(pred, label, CLASS_NAMES, empty_distance=empty_distance)


def evaluate(args) -> dict:
    setup = prepare(args, "acdc", REPO_ROOT / "data" / "ACDC", (256, 256))
    table = Table(max(len(c) for c in setup.cases) + 4)
    print(f"checkpoint {setup.checkpoint} (iteration {setup.state.get('iteration')}), {len(setup.cases)} volumes "
          f"from {setup.list_path}, device {setup.device}, slices zoomed to {setup.patch_size}")
    print(table.header())
    rows, volumes, start = [], [], time.perf_counter()
    for name in setup.cases:
        image, label = load_volume(acdc_volume_path(setup.root, name))
        pred, per_class = evaluate_volume(setup.model, image, label, setup.patch_size, setup.device,
                                          args.batch_slices, setup.amp_dtype, args.empty_distance)
        volumes.append(per_class)
        for c, cname in CLASS_NAMES.items():
            rows.append({"case": name, "class": cname, **per_class[c]})
            print(table.line(f"{name} {cname}", per_class[c], case_note(per_class[c])), flush=True)
        if args.png:
            save_overlay_png(setup.out_dir / "png" / f"{name}.png", image, label, pred, axis=0)
        if args.save_nii:
            save_nii(setup.out_dir / "predictions", name, image, label, pred)
    summary = {**summarize_multiclass(volumes, CLASS_NAMES, args.empty_distance), **setup.info(args),
               "batch_slices": args.batch_slices, "seconds": round(time.perf_counter() - start, 1)}
    for cname, s in summary["per_class"].items():
        print(table.mean_std(cname, s))
    print(table.mean_std("", summary))
    print(summary["distance_policy"])
    csv_path, json_path = write_results(setup.out_dir, rows, CSV_COLUMNS, summary)
    print(f"wrote {csv_path} and {json_path}")
    return summary


def main(argv=None) -> dict:
    """Evaluate and return the summary dict; known problems end with one line naming the file."""
    args = parse_args(argv)
    use_allocator(args.malloc, pick_device(args.device).type, may_reexec=argv is None)
    try:
        return evaluate(args)
    except (CheckpointError, DataError, EvaluationError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
