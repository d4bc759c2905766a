#!/usr/bin/env bash
# CrossMatch on LA: train, then evaluate the final checkpoint and print the table.
#   bash run_la.sh 8 [extra train_la.py flags]      # 4, 8 or 16 labeled cases (Table I); data from $LA_ROOT or data/LA
#   bash run_la.sh --demo [extra train_la.py flags] # synthetic data, a few minutes on a CPU, no download
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
  echo "$out/LA_${exp}_${labelnum}_labeled"
}

if [[ ${1:-} == --demo ]]; then
  shift
  root=${DEMO_ROOT:-data/demo_LA}
  [[ -f $root/train.list ]] || $PY code/make_synthetic.py --task la --out "$root" --n_train 20 --n_test 4 --shape 48 48 40
  start=$(date +%s)
  $PY code/train_la.py --root_path "$root" --exp demo --labelnum 4 --max_iterations 250 --patch_size 32 32 32 \
      --base_lr 3e-3 --save_every 100 --log_every 10 --image_every 100 --overwrite "$@"
  $PY code/test_la.py --run "$(run_dir_for 4 --exp demo "$@")" --root_path "$root" --list test.list \
      --patch_size 32 32 32 --stride_xy 16 --stride_z 8 --sw_batch 4
  echo "demo finished in $(( $(date +%s) - start )) s"
  exit 0
fi

labelnum=${1:-}
if [[ ! $labelnum =~ ^[0-9]+$ ]]; then
  echo "usage: bash run_la.sh LABELNUM [train_la.py flags]   (LABELNUM 4, 8 or 16 for Table I)" >&2
  echo "       bash run_la.sh --demo                          (synthetic data, no download)" >&2
  exit 2
fi
shift
root=${LA_ROOT:-data/LA}
if [[ ! -f $root/train.list ]]; then
  echo "error: no LA data at '$root' (expected $root/train.list and '$root/2018LA_Seg_Training Set/<case>/mri_norm2.h5')." >&2
  echo "  Get the UA-MT preprocessed LA h5 files (README.md, section 'Data'), then set LA_ROOT=/path/to/LA or link it to data/LA." >&2
  echo "  To try the pipeline without any download: bash run_la.sh --demo" >&2
  exit 1
fi
$PY code/train_la.py --root_path "$root" --labelnum "$labelnum" "$@"
if [[ -f $root/test.list ]]; then
  $PY code/test_la.py --run "$(run_dir_for "$labelnum" "$@")" --root_path "$root" --list test.list
else
  echo "note: $root/test.list is missing, so the final checkpoint was not evaluated; evaluate it with" >&2
  echo "  python code/test_la.py --run $(run_dir_for "$labelnum" "$@") --root_path $root --list <list file>" >&2
fi
