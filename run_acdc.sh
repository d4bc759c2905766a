#!/usr/bin/env bash
# CrossMatch on ACDC: train, then evaluate the final checkpoint and print the table.
#   bash run_acdc.sh 7 [extra train_acdc.py flags]  # 3 or 7 labeled patients (Table II); data from $ACDC_ROOT or data/ACDC
#   bash run_acdc.sh --demo [extra train_acdc.py flags] # synthetic data, a few minutes on a CPU, no download
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}

run_dir_for() {  # run folder that train_la.py will use for these flags (mirrors utils/run.py run_dir_of)
  local labelnum=$1 exp=CrossMatch out=model; shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --exp) exp=$2; shift ;;
      --exp=*) exp=${1#*=} ;;
      --out_dir) out=$2; shift ;;
      --out_dir=*) out=${1#*=} ;;
    esac
    shift
  done
  echo "$out/ACDC_${exp}_${labelnum}_labeled"
}

if [[ ${1:-} == --demo ]]; then
  shift
  root=${DEMO_ROOT:-data/demo_ACDC}
  [[ -f $root/train_slices.list ]] || $PY code/make_synthetic.py --task acdc --out "$root" --n_train 20 --n_val 2 --n_test 4 --shape 8 64 64
  start=$(date +%s)
  $PY code/train_acdc.py --root_path "$root" --exp demo --labelnum 3 --max_iterations 500 --base_lr 0.03 --patch_size 64 64 \
      --batch_size 8 --labeled_bs 4 --save_every 100 --log_every 10 --image_every 100 --overwrite "$@"
  $PY code/test_acdc.py --run "$(run_dir_for 3 --exp demo "$@")" --root_path "$root" --list test.list --patch_size 64 64
  echo "demo finished in $(( $(date +%s) - start )) s"
  exit 0
fi

labelnum=${1:-}
if [[ ! $labelnum =~ ^[0-9]+$ ]]; then
  echo "usage: bash run_acdc.sh LABELNUM [train_acdc.py flags]   (LABELNUM 3 or 7 for Table II; 1 3 7 14 21 28 35 70 allowed)" >&2
  echo "       bash run_acdc.sh --demo                            (synthetic data, no download)" >&2
  exit 2
fi
shift
root=${ACDC_ROOT:-data/ACDC}
if [[ ! -f $root/train_slices.list ]]; then
  echo "error: no ACDC data at '$root' (expected $root/train_slices.list, $root/data/<volume>.h5 and $root/data/slices/)." >&2
  echo "  Get the SSL4MIS preprocessed ACDC h5 files (README.md, section 'Data'), then set ACDC_ROOT=/path/to/ACDC or link it to data/ACDC." >&2
  echo "  To try the pipeline without any download: bash run_acdc.sh --demo" >&2
  exit 1
fi
$PY code/train_acdc.py --root_path "$root" --labelnum "$labelnum" "$@"
if [[ -f $root/test.list ]]; then
  $PY code/test_acdc.py --run "$(run_dir_for "$labelnum" "$@")" --root_path "$root" --list test.list
else
  echo "note: $root/test.list is missing, so the final checkpoint was not evaluated; evaluate it with" >&2
  echo "  python code/test_acdc.py --run $(run_dir_for "$labelnum" "$@") --root_path $root --list val.list" >&2
fi
