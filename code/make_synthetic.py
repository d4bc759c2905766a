"""Write a small synthetic data set in the real LA or ACDC layout (for the demo and for trying the pipeline).

    python code/make_synthetic.py --task la --out data/demo_LA
    python code/make_synthetic.py --task acdc --out data/demo_ACDC
"""
import argparse

from utils import resolve
from utils.flags import ArgumentParser
from utils.synthetic import make_acdc, make_la


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["la", "acdc"], required=True)
    p.add_argument("--out", required=True, help="root to write (relative paths: against the repository root)")
    p.add_argument("--n_train", type=int, default=20, help="LA: training volumes; ACDC: training patients")
    p.add_argument("--n_val", type=int, default=2, help="ACDC: validation patients")
    p.add_argument("--n_test", type=int, default=4, help="LA: test volumes; ACDC: test patients")
    p.add_argument("--shape", type=int, nargs="+", help="LA: X Y Z (default 64 64 48); ACDC: slices H W (default 8 64 64)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = resolve(args.out)
    if args.task == "la":
        shape = tuple(args.shape or (64, 64, 48))
        if len(shape) != 3:
            raise SystemExit("error: --shape: expected X Y Z for LA")
        make_la(out, n_train=args.n_train, n_test=args.n_test, shape=shape, seed=args.seed)
    else:
        shape = tuple(args.shape or (8, 64, 64))
        if len(shape) != 3:
            raise SystemExit("error: --shape: expected SLICES H W for ACDC")
        make_acdc(out, n_train_patients=args.n_train, n_val=args.n_val, n_test=args.n_test, shape=shape,
                  seed=args.seed)
    print(f"wrote synthetic {args.task.upper()} data to {out}")
    return out


if __name__ == "__main__":
    main()
