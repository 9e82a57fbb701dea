#!/usr/bin/env bash
# The GPU training runs of docs/benchmarks.md, on a host with 2 GPUs (python3 with jax[cuda] and the
# project's dependencies; grain carried as wheels where the image lacks it). Each stage prints one table
# (benchmarks/train_table.py). Usage: bash benchmarks/gpu_train_runs.sh STAGE... (stages below).
#   scale125   125M: 1 GPU; FSDP=2 without and with the collective-overlap flags; data parallel 2 GPUs
#   procs      125M: 2 processes x 1 GPU (NCCL), SIGTERM to process 1, resume on 1 process x 1 GPU
#   scale370   370M: 1 GPU (remat none and layer), FSDP=2
#   scale1b    ~1.3B: 1 GPU
#   onegpu     what needs one GPU only: 125M, 370M (remat layer and none) and ~1.3B, short runs
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
RUNS=${RUNS:-/tmp/hsa_runs}
mkdir -p "$RUNS"
COMMON=(data.index=bundled log_every=10 eval_every=100000 eval_batches=1 checkpoint_every=100000)

train() {  # train NAME TIMEOUT ARGS...: one single-process run into $RUNS/NAME
  local name=$1 limit=$2; shift 2
  echo "+ hsa-train $* workdir=$RUNS/$name"
  timeout "$limit" python3 -m train.main "$@" "${COMMON[@]}" workdir="$RUNS/$name" 2>&1 \
    | grep -v -e '^W[0-9]' -e '^I[0-9]' -e 'train: *[0-9]*%' | tail -4
}

table() { python3 benchmarks/train_table.py "$@" --from-step 10; }

for stage in "$@"; do
  case $stage in
  scale125)
    C=(--config configs/swa_hsa_125m.yaml steps=40)
    CUDA_VISIBLE_DEVICES=0 train r125_1gpu 300 "${C[@]}"
    train r125_fsdp2_nooverlap 300 "${C[@]}" global_batch_size=16 mesh.data=1 mesh.fsdp=2 run.collective_overlap=false
    train r125_fsdp2 300 "${C[@]}" global_batch_size=16 mesh.data=1 mesh.fsdp=2
    train r125_dp2 300 "${C[@]}" global_batch_size=16 mesh.data=2 mesh.fsdp=1
    table "$RUNS"/r125_1gpu "$RUNS"/r125_fsdp2_nooverlap "$RUNS"/r125_fsdp2 "$RUNS"/r125_dp2
    ;;
  procs)
    W=$RUNS/r125_2proc
    A=(--config configs/swa_hsa_125m.yaml steps=50 global_batch_size=16 mesh.data=2 mesh.fsdp=1 "${COMMON[@]}"
       workdir="$W")
    echo "+ 2 processes x 1 GPU: hsa-train --coordinator localhost:9476 --num-processes 2 --process-id I --local-devices I ${A[*]}"
    for i in 0 1; do
      timeout 400 python3 -m train.main --coordinator localhost:9476 --num-processes 2 --process-id $i \
        --local-devices $i "${A[@]}" > "$RUNS/proc$i.log" 2>&1 &
      pids[$i]=$!
    done
    until grep -q '"step": 30,' "$W/metrics.jsonl" 2>/dev/null || ! kill -0 "${pids[0]}" 2>/dev/null; do sleep 0.5; done
    kill -TERM "${pids[1]}"; echo "+ SIGTERM to process 1 (pid ${pids[1]}) after step 30 was logged"
    wait "${pids[0]}"; echo "process 0 exit $?"; wait "${pids[1]}"; echo "process 1 exit $?"
    grep -h -e 'SIGTERM' -e 'steps ' -e 'error' -e 'preemption' "$RUNS"/proc*.log | grep -v '^W[0-9]'
    ls "$W/checkpoints"
    cp -r "$W" "$W.interrupted"
    echo "+ resume on 1 process x 1 GPU (same global batch)"
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m train.main "${A[@]}" mesh.data=1 2>&1 \
      | grep -v -e '^W[0-9]' -e '^I[0-9]' -e 'train: *[0-9]*%' | tail -4
    table "$W.interrupted" "$W"
    ;;
  scale370)
    C=(--config configs/swa_hsa_370m_pile.yaml steps=40 seq_len=8192 global_batch_size=8 optim.grad_accum=1)
    CUDA_VISIBLE_DEVICES=0 train r370_1gpu 400 "${C[@]}" run.remat=none
    CUDA_VISIBLE_DEVICES=0 train r370_1gpu_remat 400 "${C[@]}" run.remat=layer
    train r370_fsdp2 400 "${C[@]}" global_batch_size=16 mesh.data=1 mesh.fsdp=2 run.remat=none
    table "$RUNS"/r370_1gpu "$RUNS"/r370_1gpu_remat "$RUNS"/r370_fsdp2
    ;;
  scale1b)
    C=(--config configs/swa_hsa_1b.yaml steps=30 seq_len=8192 global_batch_size=8 optim.grad_accum=1)
    CUDA_VISIBLE_DEVICES=0 train r1b_1gpu 500 "${C[@]}"
    table "$RUNS"/r1b_1gpu
    ;;
  onegpu)
    export CUDA_VISIBLE_DEVICES=0
    train r125_1gpu 110 --config configs/swa_hsa_125m.yaml steps=30
    C=(seq_len=8192 global_batch_size=8 optim.grad_accum=1 steps=30)
    train r370_1gpu_remat 150 --config configs/swa_hsa_370m_pile.yaml "${C[@]}" run.remat=layer
    train r1b_1gpu 170 --config configs/swa_hsa_1b.yaml "${C[@]}" steps=20 run.remat=layer
    train r370_1gpu 100 --config configs/swa_hsa_370m_pile.yaml "${C[@]}" run.remat=none
    table "$RUNS"/r125_1gpu "$RUNS"/r370_1gpu_remat "$RUNS"/r370_1gpu "$RUNS"/r1b_1gpu
    unset CUDA_VISIBLE_DEVICES
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
