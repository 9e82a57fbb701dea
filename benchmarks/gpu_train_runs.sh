#!/usr/bin/env bash
# The GPU training runs of docs/benchmarks.md, on a host with 2 GPUs (python3 with jax[cuda] and the
# project's dependencies; grain carried as wheels where the image lacks it). Each stage prints one table
# (benchmarks/train_table.py). Usage: bash benchmarks/gpu_train_runs.sh STAGE... (stages below).
#   scale125   125M: 1 GPU unrolled (the default) and scanned; FSDP=2 without and with the collective-overlap flags; data
#              parallel 2 GPUs; each run traces 2 steps after its timed ones (benchmarks/trace_summary.py)
#   procs      125M: 2 processes x 1 GPU (NCCL), SIGTERM to process 1, resume on 1 process x 1 GPU
#   scale370   370M: 1 GPU (unrolled with remat none, scanned with remat layer), FSDP=2 both ways (fsdp370: FSDP alone)
#   scale1b    ~1.3B: 1 GPU
#   fsdp370_scanned_none  370M FSDP=2 at global batch 16, scanned, remat none
#   fsdp370_b8 370M FSDP=2 at global batch 8 (4 per GPU), remat none, unrolled and scanned
#   breakdown  where a step's time goes (benchmarks/train_step.py), 125M and 370M at 8K on 1 GPU
#   decode     1M-token prefill and decode at batch 1 and 8 (benchmarks/decode.py), traced and summarised
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
RUNS=${RUNS:-/tmp/hsa_runs}
mkdir -p "$RUNS"
COMMON=(data.index=bundled log_every=10 eval_every=100000 eval_batches=1 checkpoint_every=100000)

train() {  # train NAME TIMEOUT ARGS...: one single-process run into $RUNS/NAME
  local name=$1 limit=$2; shift 2
  echo "+ hsa-train $* workdir=$RUNS/$name"
  rm -rf "${RUNS:?}/$name"  # a fresh run: a workdir left by an earlier call would be resumed
  timeout "$limit" python3 -m train.main "$@" "${COMMON[@]}" workdir="$RUNS/$name" 2>&1 \
    | grep -v -e '^W[0-9]' -e '^I[0-9]' -e 'train: *[0-9]*%' | tail -4
}

table() { python3 benchmarks/train_table.py "$@" --from-step 10; }
traces() { for d in "$@"; do python3 benchmarks/trace_summary.py "$d/profile" --top 6; done; }

for stage in "$@"; do
  case $stage in
  scale125)
    C=(--config configs/swa_hsa_125m.yaml steps=42 run.profile_from=40 run.profile_steps=2)
    CUDA_VISIBLE_DEVICES=0 train r125_1gpu 200 "${C[@]}"
    CUDA_VISIBLE_DEVICES=0 train r125_1gpu_scanned 200 "${C[@]}" run.scan_layers=true
    S=("${C[@]}" global_batch_size=16 run.scan_layers=true)  # scanned: each layer's all-gather sits in the loop
    train r125_fsdp2_nooverlap 200 "${S[@]}" mesh.data=1 mesh.fsdp=2 run.collective_overlap=false
    train r125_fsdp2 200 "${S[@]}" mesh.data=1 mesh.fsdp=2
    train r125_dp2 200 "${S[@]}" mesh.data=2 mesh.fsdp=1
    R=("$RUNS"/r125_1gpu "$RUNS"/r125_1gpu_scanned "$RUNS"/r125_fsdp2_nooverlap "$RUNS"/r125_fsdp2 "$RUNS"/r125_dp2)
    table "${R[@]}"
    traces "${R[@]}"
    ;;
  procs)
    W=$RUNS/r125_2proc
    rm -rf "$W" "$W.interrupted"
    A=(--config configs/swa_hsa_125m.yaml steps=50 global_batch_size=16 mesh.data=2 mesh.fsdp=1 run.scan_layers=true "${COMMON[@]}"
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
    echo "+ resume on 1 process x 1 GPU (same global batch of 16, as 2 micro-batches of 8 to fit one GPU)"
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m train.main "${A[@]}" mesh.data=1 optim.grad_accum=2 2>&1 \
      | grep -v -e '^W[0-9]' -e '^I[0-9]' -e 'train: *[0-9]*%' | tail -4
    table "$W.interrupted" "$W"
    ;;
  scale370|fsdp370)  # scanned with remat none runs out of memory at 8 x 8192 (139 GiB; FSDP=2: 143 GiB)
    C=(--config configs/swa_hsa_370m_pile.yaml steps=32 seq_len=8192 global_batch_size=8 optim.grad_accum=1
       run.profile_from=30 run.profile_steps=2)
    R=()
    if [ "$stage" = scale370 ]; then
      CUDA_VISIBLE_DEVICES=0 train r370_1gpu_unrolled 300 "${C[@]}" run.remat=none run.scan_layers=false
      CUDA_VISIBLE_DEVICES=0 train r370_1gpu_remat 300 "${C[@]}" run.remat=layer run.scan_layers=true
      R=("$RUNS"/r370_1gpu_unrolled "$RUNS"/r370_1gpu_remat)
    fi
    F=("${C[@]}" global_batch_size=16 mesh.data=1 mesh.fsdp=2)
    train r370_fsdp2 300 "${F[@]}" run.remat=none run.scan_layers=false
    train r370_fsdp2_scanned 300 "${F[@]}" run.remat=layer run.scan_layers=true
    R+=("$RUNS"/r370_fsdp2 "$RUNS"/r370_fsdp2_scanned)
    table "${R[@]}"
    traces "${R[@]}"
    ;;
  fsdp370_b8)  # FSDP=2 at 4 sequences per GPU: half the activations, so remat none fits scanned and the
               # scheduler has memory to prefetch the all-gathers of the unrolled program
    F=(--config configs/swa_hsa_370m_pile.yaml steps=32 seq_len=8192 global_batch_size=8 optim.grad_accum=1
       run.profile_from=30 run.profile_steps=2 mesh.data=1 mesh.fsdp=2 run.remat=none)
    train r370_fsdp2_b8 300 "${F[@]}" run.scan_layers=false
    train r370_fsdp2_b8_scanned 300 "${F[@]}" run.scan_layers=true
    R=("$RUNS"/r370_fsdp2_b8 "$RUNS"/r370_fsdp2_b8_scanned)
    table "${R[@]}"
    traces "${R[@]}"
    ;;
  scale1b)
    C=(--config configs/swa_hsa_1b.yaml steps=30 seq_len=8192 global_batch_size=8 optim.grad_accum=1)
    CUDA_VISIBLE_DEVICES=0 train r1b_1gpu 300 "${C[@]}" run.profile_from=28 run.profile_steps=2
    table "$RUNS"/r1b_1gpu
    traces "$RUNS"/r1b_1gpu
    ;;
  fsdp370_scanned_none)  # FSDP=2, 8 per GPU, scanned without remat (asked 143 GiB before the chunked LM head)
    F=(--config configs/swa_hsa_370m_pile.yaml steps=32 seq_len=8192 global_batch_size=16 optim.grad_accum=1
       run.profile_from=30 run.profile_steps=2 mesh.data=1 mesh.fsdp=2 run.remat=none run.scan_layers=true)
    train r370_fsdp2_scanned_none 300 "${F[@]}"
    table "$RUNS"/r370_fsdp2_scanned_none
    traces "$RUNS"/r370_fsdp2_scanned_none
    ;;
  breakdown)
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/train_step.py --config configs/swa_hsa_125m.yaml \
      --trace-dir "$RUNS/step125" 2>&1 | grep -v -e '^W[0-9]' -e '^I[0-9]'
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/train_step.py --config configs/swa_hsa_370m_pile.yaml \
      seq_len=8192 global_batch_size=8 optim.grad_accum=1 --trace-dir "$RUNS/step370" 2>&1 | grep -v -e '^W[0-9]' -e '^I[0-9]'
    ;;
  decode)
    rm -rf "$RUNS/decode_trace"
    CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/decode.py --contexts 1M --batches 1,8 --steps 64 \
      --trace "$RUNS/decode_trace" 2>&1 | grep -v -e '^W[0-9]' -e '^I[0-9]'
    for t in "$RUNS"/decode_trace/prefill_*; do python3 benchmarks/trace_summary.py "$t" --steps 1 --top 8; done
    for t in "$RUNS"/decode_trace/step_* "$RUNS"/decode_trace/greedy_*; do
      python3 benchmarks/trace_summary.py "$t" --steps 64 --top 12
    done
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
