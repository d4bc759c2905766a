#!/usr/bin/env bash
# The prepared plan for a session lent a GPU for 15 minutes (docs/PERFORMANCE.md, "The GPU plan"): three device
# calls, one right after the other (the machine stays warm 30 s), each carrying one data tarball.
#
#   here, before call N:   bash tests/gpu_plan.sh prepare N    # .whl/ (medpy) and .carry/ (step N's tarball)
#   call N on the device:  bash tests/gpu_plan.sh N            # with carry [".whl", ".carry"]
#
#   1  wheels, LA train part 1 unpacked, tests/test_cuda.py, benchmark.py (LA, compiled, fp32 and bf16)  ~4-6 min
#   2  LA train part 2 unpacked, the loader on 16 cores, the LA-8 CrossMatch runs started under setsid     ~1 min
#   3  LA test cases unpacked, wait for the runs, evaluate their final checkpoints, the Table I rows       the rest
#
# Everything a call brings back is under $OUT (at most 8 files): step<N>.log and step<N>.tgz. Between calls the
# data, the installed wheels and the runs stay in $GPU_WORK on the machine. Knobs (environment): SEEDS (default
# 1337 1338 1339: three runs at once), AMP (none: fp32 with TF32; bf16 if step 1 shows fp32 cannot finish),
# COMPILE (1), DEVICE (cuda), MAX_ITERATIONS (empty: the paper's 9000), WAIT_S (step 3's wait, 480),
# BENCH_FLAGS, TRAIN_EXTRA, EVAL_EXTRA, LOADER_BATCHES (30), SETTLE_S (60), DATA_DIR (the tarballs, here).
# Rehearsal on a CPU: docs/PERFORMANCE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
step=${1:?usage: bash tests/gpu_plan.sh prepare N | N   (N = 1, 2 or 3)}
TARBALLS=([1]=LA_train_part1 [2]=LA_train_part2 [3]=LA_test)
WORK=${GPU_WORK:-/tmp/crossmatch-gpu}
DATA=$WORK/data RUNS=$WORK/model LOGS=$WORK/logs
SEEDS=${SEEDS:-1337 1338 1339}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}

if [[ $step == prepare ]]; then  # here: the wheels the GPU image lacks and this step's tarball (.gitignore)
  n=${2:?usage: bash tests/gpu_plan.sh prepare N}
  name=${TARBALLS[$n]:?N is 1, 2 or 3}
  src=${DATA_DIR:-../shared/data}
  [[ -n $(ls .whl/medpy-*.whl 2>/dev/null) ]] || ${PIP:-python -m pip} wheel -q --no-deps medpy==0.5.2 -w .whl
  rm -rf .carry && mkdir .carry
  cp "$src/$name.tar.xz" .carry/
  (cd "$src" && grep " $name.tar.xz\$" SHA256SUMS) >.carry/SHA256SUMS
  (cd .carry && sha256sum --quiet -c SHA256SUMS)
  du -sbc .whl .carry $(git ls-files) 2>/dev/null | tail -1 |
    awk '{printf "what travels: %.1f MiB of the 64 MiB a call takes\n", $1 / 2^20; exit ($1 > 64 * 2^20)}'
  exit
fi

: "${OUT:?OUT: the device tool output folder; to rehearse, export OUT=a new empty folder}"
[[ ${TARBALLS[$step]:-} ]] || { echo "error: step $step: expected 1, 2 or 3" >&2; exit 2; }
mkdir -p "$DATA" "$RUNS" "$LOGS"
exec > >(tee "$OUT/step$step.log") 2>&1
started=$(date +%s)
note() { echo "[step $step, $(( $(date +%s) - started )) s] $*"; }
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
(cd .carry && sha256sum --quiet -c SHA256SUMS)
xz -dc ".carry/${TARBALLS[$step]}.tar.xz" | tar -x -C "$DATA"
note "unpacked ${TARBALLS[$step]} into $DATA ($(ls "$DATA/LA/2018LA_Seg_Training Set" 2>/dev/null | wc -l) LA cases)"
compile_flag=(); [[ ${COMPILE:-1} == 1 ]] && compile_flag=(--compile)
run_name() { echo "table1_la8_crossmatch_paper_s$1"; }  # as code/reproduce.py names Table I's LA-8 CrossMatch runs

case $step in
1)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  $PY -c "import medpy, h5py, scipy, skimage, tqdm, tensorboard, matplotlib; print('imports ok')"
  $PY -m pytest -q -s -rs -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$LOGS/test_cuda.log" || note "test_cuda failed"
  for amp in none bf16; do
    $PY code/benchmark.py --task la --device "$DEVICE" --amp "$amp" "${compile_flag[@]}" --methods supervised crossmatch \
      ${BENCH_FLAGS:---warmup 3 --iters 30} --json "$LOGS/bench_la_$amp.json" || note "benchmark amp $amp failed"
  done
  ;;
2)
  $PY code/benchmark.py --task la --loader --root_path "$DATA/LA" --workers 1 2 4 5 8 --batches "${LOADER_BATCHES:-30}" \
    --json "$LOGS/loader_la.json" || note "loader benchmark failed"
  for seed in $SEEDS; do
    name=$(run_name "$seed")
    setsid nohup $PY code/train_la.py --labelnum 8 --method crossmatch --preset paper --seed "$seed" --exp "$name" \
      --out_dir "$RUNS" --root_path "$DATA/LA" --device "$DEVICE" --amp "${AMP:-none}" "${compile_flag[@]}" \
      ${MAX_ITERATIONS:+--max_iterations $MAX_ITERATIONS} ${TRAIN_EXTRA:-} >"$LOGS/$name.log" 2>&1 </dev/null &
    note "started $name (pid $!)"
  done
  sleep "${SETTLE_S:-60}"
  for seed in $SEEDS; do tail -c 400 "$LOGS/$(run_name "$seed").log" | tr '\r' '\n' | tail -2; done
  ;;
3)
  deadline=$(( started + ${WAIT_S:-480} ))
  pending() { for seed in $SEEDS; do
      d=$RUNS/LA_$(run_name "$seed")_8_labeled
      n=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['args']['max_iterations'])" "$d/config.json" 2>/dev/null || echo 9000)
      [[ -f $d/iter_$n.pth ]] || echo "$seed"; done; }
  while [[ -n $(pending) && $(date +%s) -lt $deadline ]]; do sleep 10; done
  [[ -z $(pending) ]] || note "not finished by the deadline: seeds $(pending | tr '\n' ' ')"
  for seed in $SEEDS; do
    d=$RUNS/LA_$(run_name "$seed")_8_labeled
    [[ " $(pending | tr '\n' ' ') " == *" $seed "* ]] && continue
    $PY code/test_la.py --run "$d" --list test.list --root_path "$DATA/LA" --device "$DEVICE" --sw_batch 8 --no_png ${EVAL_EXTRA:-} \
      || note "evaluation of $d failed"
  done
  $PY code/reproduce.py table1 --aggregate_only --runs_dir "$RUNS" --out "$WORK/results" --la_root "$DATA/LA" \
    || note "aggregation failed"
  ;;
esac
note "done"
cp "$OUT/step$step.log" "$LOGS/step$step.log"
tar -czf "$OUT/step$step.tgz" -C "$WORK" logs $(cd "$WORK" && ls -d results 2>/dev/null) \
  $(cd "$WORK" && find model -maxdepth 3 \( -name '*.json' -o -name '*.csv' -o -name log.txt \) 2>/dev/null)
