"""Evaluate an LA model (3D V-Net) on a case list with sliding-window inference (docs/PROTOCOL.md).

    python code/test_la.py --run model/LA_CrossMatch_8_labeled                 # its final checkpoint on test.list
    python code/test_la.py --ckpt path/to/iter_9000.pth --root_path data/LA --list test.list

Prints a line per case and the mean and std; writes metrics.csv, summary.json and png/<case>.png into eval_<list>/ in
the run folder (or --out). No post-processing unless --lcc.
"""
import time

import numpy as np

from utils.data import load_case
from utils.evaluation import (Table, case_note, eval_parser, largest_connected_component, prepare, protocol, report,
                              run_evaluation, save_nii, save_overlay_png, sliding_window)
from utils.metrics import METRICS, binary_metrics, summarize


def parse_args(argv=None):
    p = eval_parser(__doc__.split("\n\n")[0], n_dims=3)
    p.add_argument("--stride_xy", type=int, default=18, help="window stride on the first two axes")
    p.add_argument("--stride_z", type=int, default=4, help="window stride on the third axis")
    p.add_argument("--sw_batch", type=int, default=1, help="windows per forward pass")
    p.add_argument("--lcc", action="store_true", help="keep only the largest connected component (off by default)")
    args = p.parse_args(argv)
    if min(args.stride_xy, args.stride_z, args.sw_batch) < 1:
        p.error("--stride_xy, --stride_z and --sw_batch must be at least 1")
    return args


def evaluate(args) -> dict:
    s = prepare(args, "la")
    table = Table(max(map(len, s.cases)))
    print(f"checkpoint {s.checkpoint} (iteration {s.iteration}), {len(s.cases)} cases from {s.list_path}, device "
          f"{s.device}, patch {s.patch_size}, stride {args.stride_xy}/{args.stride_z}, lcc {'on' if args.lcc else 'off'}")
    print(table.header())
    rows, start = [], time.perf_counter()
    for case in s.cases:
        image, label = load_case("la", s.root, case)
        _, pred = sliding_window(s.model, image, s.patch_size, args.stride_xy, args.stride_z, s.device, args.sw_batch,
                                 s.amp)
        if args.lcc:
            pred = largest_connected_component(pred == 1).astype(np.uint8)
        m = binary_metrics(pred == 1, label != 0, empty_distance=args.empty_distance)
        rows.append({"case": case, **m})
        print(table.line(case, m, case_note(m)), flush=True)
        if args.png:
            save_overlay_png(s.out_dir / "png" / f"{case}.png", image, label, pred, axis=2)
        if args.save_nii:
            save_nii(s.out_dir / "predictions", case, image, label, pred)
    summary = {**summarize(rows, args.empty_distance), **protocol(s, args), "lcc": args.lcc,
               "stride_xy": args.stride_xy, "stride_z": args.stride_z, "sw_batch": args.sw_batch,
               "seconds": round(time.perf_counter() - start, 1)}
    return report(table, s.out_dir, rows, ["case", *METRICS, "empty_pred", "empty_label", "both_empty"], summary)


def main(argv=None) -> dict:
    return run_evaluation(evaluate, parse_args(argv))


if __name__ == "__main__":
    main()
