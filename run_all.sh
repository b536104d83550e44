#!/usr/bin/env bash
# Every configuration of the paper's tables, then the tables (ours beside the paper's numbers).
#
#   bash run_all.sh                 # all tables, on CUDA with AMP (bf16), resumable
#   bash run_all.sh --list          # print every configuration (table, command); run nothing
#   bash run_all.sh --only VI       # one table: II III IV V VI VII 8 (Fig. 8)
#   bash run_all.sh --gpu-check     # on a new GPU (8 minutes): the device tests, benchmarks eager / compiled /
#                                   # CUDA graphs, JOBS 1-8 at once, NCCL; one table, in $RESULTS/gpu-check.txt.
#                                   # Without CUDA the same parts at a tiny size, in a few minutes
#   SCALE=smoke bash run_all.sh     # tiny generated stand-in data, 2 epochs, CPU: checks the pipeline
#   SCALE=cpu bash run_all.sh       # the CPU study: real Fashion-MNIST-LT, small budget, 3 seeds, about
#                                   # 50 minutes on two cores (README: "What the CPU study shows")
#   SCALE=cpu-long bash run_all.sh  # the same data at the paper's 200 epochs: Table II's methods and AllNC with
#                                   # P2P's means in the other space, balanced Table V (seeds 0 1 2), Table VII's
#                                   # ablations and gamma 1, 4 (seeds 0 1); hours on two cores
#
# Settings (environment variables):
#   SEEDS="0"              seeds per configuration; "0 1 2" makes the tables show mean±std
#   RESULTS=results        result JSONs (one per run), checkpoints and logs/
#   GPUS=                  GPU ids to spread runs over, one run per GPU at a time
#                          (default: CUDA_VISIBLE_DEVICES if set, else one run at a time)
#   JOBS=                  runs at a time (default: the number of GPUs in GPUS, else 1); with one GPU,
#                          GPUS=0 JOBS=4 puts four CIFAR runs on it at once (they are launch-bound)
#   IMAGENET_LT_ROOT=      ImageFolder root of ImageNet-LT (train/ and val/) -> Table III
#   IMAGENET_LT_TRAIN_LIST=, IMAGENET_LT_TEST_LIST=   the standard split files, if you have them
#   INAT2018_ROOT=         ImageFolder root of iNaturalist 2018 -> Table IV
#   INAT2018_TRAIN_LIST=, INAT2018_TEST_LIST=
#   NPROC=1                processes per run for Tables III and IV: NPROC > 1 launches each of their runs
#                          through torchrun on NPROC GPUs (those in GPUS, else all visible); --batch-size
#                          stays the global batch. Best with --only III / --only IV (they take the GPUs)
#   TORCHRUN_ARGS=--standalone   torchrun's arguments besides --nproc-per-node. Two machines: the same
#                          command on both, with TORCHRUN_ARGS="--nnodes 2 --node-rank R --master-addr HOST0
#                          --master-port 29500" (R = 0 on HOST0, whose RESULTS get the JSONs; 1 on the other)
#   WIDTH=                 CIFAR ResNet base width for every AllNC-recipe run (default: allnc.py's, 64 on
#                          CIFAR as GLMC's ResNet-32; WIDTH=16: the thin 0.46M network). Baselines run
#                          with --recipe own keep their recipe's network.
#   EXTRA=""               flags added to every run (e.g. "--compile")
#   PYTHON=python
# A finished configuration (its result JSON exists and is complete) is skipped; an interrupted
# one resumes from its last epoch checkpoint. Runs that fail (e.g. a NaN loss) are reported at
# the end and the others go on.
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
SCALE=${SCALE:-full}
if [ "$SCALE" = cpu ]; then SEEDS=${SEEDS:-0 1 2}; RESULTS=${RESULTS:-results/cpu}; fi
if [ "$SCALE" = cpu-long ]; then RESULTS=${RESULTS:-results/cpu-long}; fi
SEEDS_SET=${SEEDS:-}         # given by the user: every configuration runs these seeds
SEEDS=${SEEDS:-0}
RESULTS=${RESULTS:-results}
EXTRA=${EXTRA:-}
WIDTH=${WIDTH:-}
NPROC=${NPROC:-1}
TORCHRUN_ARGS=${TORCHRUN_ARGS:---standalone}
ONLY=""
LIST=0
while [ $# -gt 0 ]; do
  case "$1" in
    --list) LIST=1 ;;
    --gpu-check) exec "$PYTHON" allnc.py --gpu-check --out "$RESULTS" ;;
    --only) shift; ONLY=${1:-}; [ -n "$ONLY" ] || { echo "error: --only needs a table: II III IV V VI VII 8" >&2; exit 2; } ;;
    -h|--help) sed -n '2,38p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1; use --list, --only TABLE, --gpu-check or --help" >&2; exit 2 ;;
  esac
  shift
done
ONLY=${ONLY#Table }; ONLY=${ONLY#Fig. }; ONLY=${ONLY#Fig}
case "$ONLY" in ""|II|III|IV|V|VI|VII|8) ;; *) echo "error: --only $ONLY: use II III IV V VI VII or 8" >&2; exit 2 ;; esac
case "$SCALE" in full|smoke|cpu|cpu-long) ;; *) echo "error: SCALE=$SCALE: use full, smoke, cpu or cpu-long" >&2; exit 2 ;; esac
# Settings are checked before anything starts: one line naming the setting and what to give, exit 2
bad() { echo "error: $1" >&2; exit 2; }
posint() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
posint "$NPROC" || bad "NPROC=$NPROC: give the processes per run, a positive integer"
[ -z "${JOBS:-}" ] || posint "$JOBS" || bad "JOBS=$JOBS: give the runs at a time, a positive integer"
[ -z "$WIDTH" ] || posint "$WIDTH" || bad "WIDTH=$WIDTH: give the CIFAR ResNet base width, a positive integer (16 or 64)"
[[ "$SEEDS" =~ ^[[:space:]]*[0-9]+([[:space:]]+[0-9]+)*[[:space:]]*$ ]] ||
  bad "SEEDS=$SEEDS: give seeds as non-negative integers separated by spaces, e.g. SEEDS=\"0 1 2\""
given_gpus=${GPUS:-}
for g in ${given_gpus//,/ }; do
  [[ "$g" =~ ^([0-9]+|(GPU|MIG)-[0-9A-Fa-f-]+)$ ]] || bad "GPUS=$GPUS: give GPU ids (indices or UUIDs) separated by spaces or commas, e.g. GPUS=\"0 1\""
done
check_python() {  # the interpreter runs allnc.py, and EXTRA's flags are allnc.py's
  local err
  err=$($PYTHON -c 'import sys, allnc; allnc.parse_args(["--dataset", "synthetic"] + sys.argv[1:])' $EXTRA 2>&1 >/dev/null) && return
  if ! $PYTHON -c 'import allnc' >/dev/null 2>&1; then
    bad "PYTHON=$PYTHON cannot import allnc.py (torch, torchvision, numpy): give an interpreter with requirements.txt installed"
  fi
  bad "EXTRA=$EXTRA: $(echo "$err" | tail -n1 | sed 's/^error: //')"
}

launcher() {  # table -> how its runs start: one process, or torchrun with NPROC (Tables III and IV)
  case "$1" in "Table III"|"Table IV") if [ "$NPROC" -gt 1 ]; then
    echo "$PYTHON -m torch.distributed.run $TORCHRUN_ARGS --nproc-per-node $NPROC"; return; fi ;; esac
  echo "$PYTHON"
}

# gamma of the Table II AllNC runs (Table VI's best rows reproduce Table II's CIFAR-100-LT numbers:
# imb 200 -> 2, imb 100 -> 3; the paper does not say for the others, we use 2). Keep in step with
# TABLE2_GAMMA in allnc.py (a test checks).
gamma_for() { if [ "$1" = cifar100 ] && [ "$2" = 100 ]; then echo 3; else echo 2; fi; }

width_arg() { [ -z "$WIDTH" ] || printf ' --width %s' "$WIDTH"; }   # own recipes keep their own network

folder_args() {  # root train_list test_list
  local a="--data-root $1 --imb-type pareto --imb 1"
  [ -n "$2" ] && a="$a --train-list $2"
  [ -n "$3" ] && a="$a --test-list $3"
  echo "$a"
}

# The CPU study: the paper's tables on real data (Fashion-MNIST-LT, N_max 1000) at a budget two CPU
# cores finish in about 50 minutes. Imbalance 10 and 100 (at 100 the two rarest classes have 16 and 10
# images: Few is not empty). Every row has the same budget (SCALE_ARGS, set below).
cpu_configs() {
  local i m g a
  for i in 10 100; do for m in allnc allnc++ ce etf rbl ncmc; do
    printf 'Table II\t--dataset fmnist --imb %s --method %s\n' $i $m
  done; done
  for g in 1 2 3 4; do printf 'Table VI\t--dataset fmnist --imb 100 --method allnc --gamma %s\n' $g; done
  for a in "" --no-hycon --no-p2p --no-gbbn --fixed-gamma; do
    printf 'Table VII\t--dataset fmnist --imb 100 --method allnc%s\n' "${a:+ $a}"
  done
  for a in 0 0.5 1 2; do printf 'Fig. 8\t--dataset fmnist --imb 100 --method allnc --alpha %s\n' $a; done
}

# The same study at the paper's schedule length (200 epochs, cosine): a third field fixes a line's seeds
# (SEEDS, if set, overrides them): Table II's methods 3 seeds, gamma 1 and 4 and the ablations 2.
# Most telling runs first, so that a partial study is still readable.
cpu_long_configs() {
  local m a g
  for m in allnc ce etf rbl ncmc allnc++; do printf 'Table II\t--dataset fmnist --imb 100 --method %s\t0 1 2\n' $m; done
  # the other reading of where P2P takes its class means (Table II gives it rows of its own)
  for m in allnc allnc++; do printf 'Table II\t--dataset fmnist --imb 100 --method %s --p2p-space z\t0 1 2\n' $m; done
  # Table V at this scale: balanced, N_max 248 (2,480 images, the long-tailed split's 2,478: the same cost)
  for m in allnc ce; do printf 'Table V\t--dataset fmnist --imb 1 --method %s\t0 1 2\n' $m; done
  for g in 1 4; do printf 'Table VI\t--dataset fmnist --imb 100 --method allnc --gamma %s\t0 1\n' $g; done
  for a in --no-hycon --no-p2p --no-gbbn --fixed-gamma; do
    printf 'Table VII\t--dataset fmnist --imb 100 --method allnc %s\t0 1\n' $a
  done
}

configs() {  # one line per configuration: TABLE<TAB>allnc.py arguments[<TAB>seeds] (or SKIP<TAB>reason)
  local d i m g a
  if [ "$SCALE" = cpu ]; then cpu_configs; return; fi
  if [ "$SCALE" = cpu-long ]; then cpu_long_configs; return; fi
  for d in cifar10 cifar100; do for i in 200 100 50 10; do
    for m in allnc allnc++; do
      printf 'Table II\t--dataset %s --imb %s --method %s --gamma %s%s\n' $d $i $m "$(gamma_for $d $i)" "$(width_arg)"
    done
    for m in ce etf rbl ncmc; do   # the paper's baseline numbers come from each method's own recipe
      printf 'Table II\t--dataset %s --imb %s --method %s --recipe own\n' $d $i $m
    done
  done; done
  for m in allnc allnc++ ce; do
    g=""; [ $m = ce ] || g=" --gamma 2"          # gamma is AllNC's (allnc.py refuses it for ce)
    if [ -n "${IMAGENET_LT_ROOT:-}" ]; then
      printf 'Table III\t--dataset imagenet_lt %s --method %s%s\n' \
        "$(folder_args "$IMAGENET_LT_ROOT" "${IMAGENET_LT_TRAIN_LIST:-}" "${IMAGENET_LT_TEST_LIST:-}")" $m "$g"
    else printf 'Table III\tSKIP %s: IMAGENET_LT_ROOT is not set\n' $m; fi
    if [ -n "${INAT2018_ROOT:-}" ]; then
      printf 'Table IV\t--dataset inat2018 %s --method %s%s\n' \
        "$(folder_args "$INAT2018_ROOT" "${INAT2018_TRAIN_LIST:-}" "${INAT2018_TEST_LIST:-}")" $m "$g"
    else printf 'Table IV\tSKIP %s: INAT2018_ROOT is not set\n' $m; fi
  done
  for d in cifar10 cifar100; do for m in allnc ce; do
    printf 'Table V\t--dataset %s --imb 1 --method %s%s%s\n' $d $m "$([ $m = ce ] || echo ' --gamma 2')" "$(width_arg)"
  done; done
  for i in 200 100; do for g in 0.5 1.0 1.5 2.0 2.5 3.0 3.5 4.0; do
    printf 'Table VI\t--dataset cifar100 --imb %s --method allnc --gamma %s%s\n' $i $g "$(width_arg)"
  done; done
  for a in "" --no-hycon --no-p2p --no-gbbn --fixed-gamma; do
    printf 'Table VII\t--dataset cifar100 --imb 100 --method allnc --gamma 3%s%s\n' "${a:+ $a}" "$(width_arg)"
  done
  for a in 0 0.25 0.5 1 2; do
    printf 'Fig. 8\t--dataset cifar100 --imb 100 --method allnc --gamma 3 --alpha %s%s\n' $a "$(width_arg)"
  done
}

selected() {
  configs | while IFS=$'\t' read -r table args seeds; do
    local t=${table#Table }; t=${t#Fig. }
    [ -z "$ONLY" ] || [ "$t" = "$ONLY" ] || continue
    printf '%s\t%s\t%s\n' "$table" "$args" "${SEEDS_SET:-${seeds:-$SEEDS}}"
  done
}

if [ "$SCALE" = smoke ]; then
  # 2 epochs so that eta (and so gamma) matters; one thread per run, two runs at a time
  SCALE_ARGS="--smoke --epochs 2 --depth 8 --batch-size 64 --device cpu --nc-every 0 --workers 0"
  STAGE2_ARGS="--wb-stage2-epochs 1"
  WIDTH=${WIDTH:-16}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  JOBS=${JOBS:-2}
elif [ "$SCALE" = cpu-long ]; then
  # the paper's 200 epochs and cosine on the CPU study's data and network; weight balancing's 10 stage-2 epochs
  SCALE_ARGS="--n-max 1000 --depth 8 --width 16 --epochs 200 --batch-size 64 --eval-every 10 --nc-every 20 --device cpu --workers 0"
  STAGE2_ARGS="--wb-stage2-epochs 10"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  JOBS=${JOBS:-2}
elif [ "$SCALE" = cpu ]; then
  # ResNet-8 width 16, 15 epochs at batch 64 (the paper's lr, wd and cosine schedule), test accuracy
  # every 5 epochs, NC metrics every 3 (Fig. 3/4 curves); AllNC++ retrains its classifier for 3 more
  SCALE_ARGS="--n-max 1000 --depth 8 --width 16 --epochs 15 --batch-size 64 --eval-every 5 --nc-every 3 --device cpu --workers 0"
  STAGE2_ARGS="--wb-stage2-epochs 3"
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  JOBS=${JOBS:-2}
else
  SCALE_ARGS=""
fi
STAGE2_ARGS=${STAGE2_ARGS:-}
scale_args() {  # the scale's flags for one configuration: stage-2 epochs only where there is a stage 2;
  local a=$SCALE_ARGS  # balanced rows of the CPU studies keep the long-tailed split's size
  case " $1 " in *" --imb 1 "*) a=${a/--n-max 1000/--n-max 248} ;; esac
  case " $1 " in *" --method allnc++ "*) echo "$a${STAGE2_ARGS:+ $STAGE2_ARGS}" ;; *) echo "$a" ;; esac
}

if [ "$LIST" = 1 ]; then
  selected | while IFS=$'\t' read -r table args seeds; do
    case "$args" in SKIP*) printf '%-9s  skipped (%s)\n' "$table" "${args#SKIP }" ;;
      *) sa=$(scale_args "$args"); printf '%-9s  %s allnc.py %s %s--seed S --out %s   # S in: %s\n' "$table" \
           "$(launcher "$table")" "$args" "${sa:+$sa }" "$RESULTS" "$seeds" ;; esac
  done
  exit 0
fi

check_python
mkdir -p "$RESULTS/logs"
# AllNC++ runs last: its stage 1 is the AllNC run of the same config, which it then continues from
# (allnc.py waits for one still training)
mapfile -t RUNS < <({ selected | grep -v -- '--method allnc++'; selected | grep -- '--method allnc++'; } |
                    while IFS=$'\t' read -r table args seeds; do
  case "$args" in SKIP*) printf '%s\t%s\t-\n' "$table" "$args" ;;
    *) for s in $seeds; do printf '%s\t%s\t%s\n' "$table" "$args" "$s"; done ;; esac
done)

GPU_LIST=(${GPUS:-${CUDA_VISIBLE_DEVICES:-}}); GPU_LIST=(${GPU_LIST[@]//,/ })
JOBS=${JOBS:-${#GPU_LIST[@]}}; [ "$JOBS" -ge 1 ] || JOBS=1
FAILED="$RESULTS/logs/failed.$$"; : > "$FAILED"
trap 'echo; echo "interrupted: run the same command again to resume" >&2; kill 0 2>/dev/null; exit 130' INT TERM

worker() {  # worker w runs every JOBS-th configuration
  local w=$1 k=0 table args seed log rc
  for line in "${RUNS[@]}"; do
    k=$((k + 1)); [ $(( (k - 1) % JOBS )) = "$w" ] || continue
    IFS=$'\t' read -r table args seed <<< "$line"
    case "$args" in SKIP*) echo "[$k/${#RUNS[@]}] $table: skipped (${args#SKIP })"; continue ;; esac
    log="$RESULTS/logs/$(echo "$table $args s$seed" | tr -c 'A-Za-z0-9.=+-' '_').log"
    launch=$(launcher "$table")
    if [ ${#GPU_LIST[@]} -gt 0 ]; then
      if [ "$launch" = "$PYTHON" ]; then export CUDA_VISIBLE_DEVICES=${GPU_LIST[$((w % ${#GPU_LIST[@]}))]}
      else export CUDA_VISIBLE_DEVICES=$(IFS=,; echo "${GPU_LIST[*]}"); fi      # torchrun: all of them
    fi
    # shellcheck disable=SC2086
    $launch allnc.py $args $(scale_args "$args") $EXTRA --seed "$seed" --out "$RESULTS" > "$log" 2>&1
    rc=$?
    if [ $rc = 0 ] && grep -q '^skip (done)' "$log"; then echo "[$k/${#RUNS[@]}] $table: $args seed $seed: skip (done)"
    elif [ $rc = 0 ] && grep -q '^skip (running elsewhere)' "$log"; then
      echo "[$k/${#RUNS[@]}] $table: $args seed $seed: skip (another process is training it into $RESULTS)"
    elif [ $rc = 0 ]; then echo "[$k/${#RUNS[@]}] $table: $args seed $seed: $(grep -m1 '^| top1' "$log" | tr -s ' ')"
    else echo "[$k/${#RUNS[@]}] $table: $args seed $seed: FAILED (exit $rc): $(tail -n1 "$log")"; echo "$log" >> "$FAILED"; fi
  done
}

for w in $(seq 0 $((JOBS - 1))); do worker "$w" & done
wait
echo
$PYTHON allnc.py --tables "$RESULTS"
n_failed=$(wc -l < "$FAILED"); rm -f "$FAILED"
if [ "$n_failed" -gt 0 ]; then echo "$n_failed run(s) failed; their logs are named above" >&2; exit 1; fi
