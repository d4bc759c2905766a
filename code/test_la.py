"""Evaluate an LA model (3D V-Net) on a case list with sliding-window inference (SPEC.md 4).

    python code/test_la.py --run model/LA_CrossMatch_8_labeled
    python code/test_la.py --ckpt path/to/iter_9000.pth --root_path data/LA --list test.list

Prints one line per case and the mean and std, writes metrics.csv and summary.json (and png/<case>.png,
with --save_nii predictions/*.nii.gz) into the run folder or --out. No post-processing unless --lcc.
"""
import time

import numpy as np

from utils.allocator import use_allocator
from utils.checkpoint import CheckpointError
from utils.checks import DataError
from utils.data_la import la_case_path, load_case
from utils.evaluation import (EvaluationError, Table, add_eval_args, case_note, largest_connected_component,
                              prepare, save_nii, save_overlay_png, write_results)
from utils.metrics import METRICS, binary_metrics, summarize
from utils.paths import REPO_ROOT
from utils.sliding_window import sliding_window_inference
from utils.run import ArgumentParser, pick_device

CSV_COLUMNS = ["case", *METRICS, "empty_pred", "empty_label", "both_empty"]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_eval_args(p, n_dims=3)
    p.add_argument("--stride_xy", type=int, default=18, help="window stride on the first two axes")
    p.add_argument("--stride_z", type=int, default=4, help="window stride on the third axis")
    p.add_argument("--sw_batch", type=int, default=1, help="windows per forward pass")
    p.add_argument("--lcc", action="store_true", help="keep only the largest connected component (off by default)")
    args = p.parse_args(argv)
    if min(args.stride_xy, args.stride_z, args.sw_batch) < 1:
        p.error("--stride_xy, --stride_z and --sw_batch must be at least 1")
    return args


def evaluate(args) -> dict:
    setup = prepare(args, "la", REPO_ROOT / "data" / "LA", (112, 112, 80))
    table = Table(max(len(c) for c in setup.cases))
    print(f"checkpoint {setup.checkpoint} (iteration {setup.state.get('iteration')}), {len(setup.cases)} cases "
          f"from {setup.list_path}, device {setup.device}, patch {setup.patch_size}, "
          f"stride {args.stride_xy}/{args.stride_z}, lcc {'on' if args.lcc else 'off'}")
    print(table.header())
    rows, start = [], time.perf_counter()
    for case in setup.cases:
        image, label = load_case(la_case_path(setup.root, case))
        _, pred = sliding_window_inference(setup.model, image, setup.patch_size, args.stride_xy, args.stride_z,
                                           setup.device, args.sw_batch, setup.amp_dtype)
        if args.lcc:
            pred = largest_connected_component(pred == 1).astype(np.uint8)
        m = binary_metrics(pred == 1, label != 0, empty_distance=args.empty_distance)
        rows.append({"case": case, **m})
        print(table.line(case, m, case_note(m)), flush=True)
        if args.png:
            save_overlay_png(setup.out_dir / "png" / f"{case}.png", image, label, pred, axis=2)
        if args.save_nii:
            save_nii(setup.out_dir / "predictions", case, image, label, pred)
    summary = {**summarize(rows, args.empty_distance), **setup.info(args), "lcc": args.lcc,
               "stride_xy": args.stride_xy, "stride_z": args.stride_z, "sw_batch": args.sw_batch,
               "seconds": round(time.perf_counter() - start, 1)}
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
