#!/usr/bin/env bash
# CrossMatch on LA: train, then evaluate the final checkpoint on test.list and print the table.
#   bash run_la.sh 8 [train_la.py flags]        # 4, 8 or 16 labeled cases (Table I); data in $LA_ROOT or data/LA
#   bash run_la.sh --demo [train_la.py flags]   # synthetic data, a few minutes on a CPU, no download
#   CML=1 bash run_la.sh 8 | --demo [flags]     # the same with the CML baseline, train_la_cml.py (docs/CML.md)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
start=$(date +%s)
train=code/train_la.py demo=(--exp demo --base_lr 3e-3)
if [[ ${CML:-0} == 1 ]]; then  # CML: its script; for the demo its run folder, stages, batch and learning rate
  train=code/train_la_cml.py demo=(--exp demo_cml --pre_iterations 50 --batch_size 4 --labeled_bs 2 --base_lr 0.01)
fi
if [[ ${1:-} == --demo ]]; then
  shift
  root=${DEMO_ROOT:-data/demo_LA}
  [[ -f $root/train.list ]] || $PY code/make_synthetic.py --task la --out "$root" --n_train 20 --n_test 4 --shape 48 48 40
  set -- "${demo[@]}" --labelnum 4 --max_iterations 250 --patch_size 32 32 32 --save_every 100 \
         --image_every 100 --overwrite "$@"
  test_flags=(--stride_xy 16 --stride_z 8 --sw_batch 4)
elif [[ ${1:-} =~ ^[0-9]+$ ]]; then
  root=${LA_ROOT:-data/LA}
  set -- --labelnum "$@"
  test_flags=()
  if [[ ! -f $root/train.list ]]; then
    echo "error: no LA data at '$root' (expected $root/train.list and '$root/2018LA_Seg_Training Set/<case>/mri_norm2.h5')." >&2
    echo "  Get the UA-MT preprocessed LA h5 files (README, 'Data'), then set LA_ROOT=/path/to/LA or link it to data/LA;" >&2
    echo "  to try the pipeline without any download: bash run_la.sh --demo" >&2
    exit 1
  fi
else
  echo "usage: bash run_la.sh LABELNUM [train_la.py flags]   (4, 8 or 16 for Table I)" >&2
  echo "       bash run_la.sh --demo [train_la.py flags]     (synthetic data, no download)" >&2
  exit 2
fi
$PY $train --root_path "$root" "$@"
run_dir=$($PY $train --root_path "$root" "$@" --print_run_dir)
if [[ -f $root/test.list ]]; then
  $PY code/test_la.py --run "$run_dir" --root_path "$root" --list test.list "${test_flags[@]}"
else
  echo "note: $root/test.list is missing; evaluate later with: python code/test_la.py --run $run_dir --list <list>" >&2
fi
echo "finished in $(( $(date +%s) - start )) s"
