#!/usr/bin/env bash
# CrossMatch on ACDC: train, then evaluate the final checkpoint on val.list (the paper's Table II set) and on
# test.list (the set BCP, AD-MT and ABD report), and print both tables.
#   bash run_acdc.sh 7 [train_acdc.py flags]       # 3 or 7 labeled patients (Table II); data in $ACDC_ROOT or data/ACDC
#   bash run_acdc.sh --demo [train_acdc.py flags]  # synthetic data, a few minutes on a CPU, no download
#   CML=1 bash run_acdc.sh 7 | --demo [flags]      # the same with the CML baseline, train_acdc_cml.py (docs/CML.md)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
start=$(date +%s)
train=code/train_acdc.py demo=(--exp demo)
if [[ ${CML:-0} == 1 ]]; then  # CML: its script; for the demo its run folder and stages
  train=code/train_acdc_cml.py demo=(--exp demo_cml --pre_iterations 100)
fi
if [[ ${1:-} == --demo ]]; then
  shift
  root=${DEMO_ROOT:-data/demo_ACDC}
  [[ -f $root/train_slices.list ]] || $PY code/make_synthetic.py --task acdc --out "$root" --n_train 20 --n_val 2 --n_test 4 --shape 8 64 64
  set -- "${demo[@]}" --labelnum 3 --max_iterations 500 --base_lr 0.03 --patch_size 64 64 --batch_size 8 --labeled_bs 4 \
         --save_every 100 --image_every 100 --overwrite "$@"
elif [[ ${1:-} =~ ^[0-9]+$ ]]; then
  root=${ACDC_ROOT:-data/ACDC}
  set -- --labelnum "$@"
  if [[ ! -f $root/train_slices.list ]]; then
    echo "error: no ACDC data at '$root' (expected $root/train_slices.list, $root/data/<volume>.h5 and $root/data/slices/)." >&2
    echo "  Get the SSL4MIS preprocessed ACDC h5 files (README, 'Data'), then set ACDC_ROOT=/path/to/ACDC or link it to data/ACDC;" >&2
    echo "  to try the pipeline without any download: bash run_acdc.sh --demo" >&2
    exit 1
  fi
else
  echo "usage: bash run_acdc.sh LABELNUM [train_acdc.py flags]   (3 or 7 for Table II; 1 3 7 14 21 28 35 70 allowed)" >&2
  echo "       bash run_acdc.sh --demo [train_acdc.py flags]     (synthetic data, no download)" >&2
  exit 2
fi
$PY $train --root_path "$root" "$@"
run_dir=$($PY $train --root_path "$root" "$@" --print_run_dir)
for list in val.list test.list; do
  if [[ -f $root/$list ]]; then
    echo "===== $list: final checkpoint of $run_dir ====="
    $PY code/test_acdc.py --run "$run_dir" --root_path "$root" --list "$list"
  else
    echo "note: $root/$list is missing; evaluate later with: python code/test_acdc.py --run $run_dir --list $list" >&2
  fi
done
echo "finished in $(( $(date +%s) - start )) s"
