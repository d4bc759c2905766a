"""Write a small synthetic data set in the real LA, ACDC, BraTS2019 or Pancreas-CT layout (for the demo and for
trying the pipeline; code/datasets/*.json describe the 3D layouts).

    python code/make_synthetic.py --task la --out data/demo_LA
    python code/make_synthetic.py --task acdc --out data/demo_ACDC
    python code/make_synthetic.py --dataset brats2019 --out data/demo_BraTS2019     # data/<case>.h5, train/val/test.txt
    python code/make_synthetic.py --dataset pancreas --out data/demo_Pancreas       # Pancreas_h5/<case>_norm.h5
    python code/make_synthetic.py --dataset custom --case_file 'vol/{case}.h5' --n_classes 3 --out data/demo_own
"""
import argparse

from utils import resolve
from utils.flags import ArgumentParser
from utils.datasets import NAMES
from utils.synthetic import make_3d, make_acdc


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["la", "acdc"], help="la: a 3D data set (--dataset, default la); acdc")
    p.add_argument("--dataset", choices=NAMES, help="the 3D layout to write (default la)")
    p.add_argument("--case_file", default="data/{case}.h5", help="--dataset custom: where a case goes in the root")
    p.add_argument("--n_classes", type=int, choices=[2, 3], default=2,
                   help="3D: 3 labels the bright distractor tube as class 2 (default 2: the foreground only)")
    p.add_argument("--out", required=True, help="root to write (relative paths: against the repository root)")
    p.add_argument("--n_train", type=int, default=20, help="3D: training volumes; ACDC: training patients")
    p.add_argument("--n_val", type=int, default=2, help="3D: validation volumes (data sets with a validation list); "
                                                         "ACDC: validation patients")
    p.add_argument("--n_test", type=int, default=4, help="3D: test volumes; ACDC: test patients")
    p.add_argument("--shape", type=int, nargs="+", help="LA: X Y Z (default 64 64 48); ACDC: slices H W (default 8 64 64)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.task is None and args.dataset is None:
        p.error("--task la|acdc or --dataset required")
    if args.task == "acdc" and args.dataset:
        p.error("--dataset: 3D data sets only")
    args.task, args.dataset = args.task or "la", args.dataset or ("la" if args.task != "acdc" else None)
    return args


def main(argv=None):
    args = parse_args(argv)
    out = resolve(args.out)
    if args.task == "la":
        shape = tuple(args.shape or (64, 64, 48))
        if len(shape) != 3:
            raise SystemExit("error: --shape: expected X Y Z for LA")
        make_3d(out, args.dataset, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                shape=shape, seed=args.seed, n_classes=args.n_classes, case_file=args.case_file)
    else:
        shape = tuple(args.shape or (8, 64, 64))
        if len(shape) != 3:
            raise SystemExit("error: --shape: expected SLICES H W for ACDC")
        make_acdc(out, n_train_patients=args.n_train, n_val=args.n_val, n_test=args.n_test, shape=shape,
                  seed=args.seed)
    print(f"wrote synthetic {(args.dataset or args.task).upper()} data to {out}")
    return out


if __name__ == "__main__":
    main()
