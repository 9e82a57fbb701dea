#!/usr/bin/env bash
# The GPU extrapolation runs of docs/results.md ("Extrapolation on GPU"): the two-stage pass-key recipe of
# configs/extrapolation_gpu.yaml (SWA+HSA) and configs/extrapolation_gpu_drt.yaml (DRT), on one GPU.
# Usage: bash benchmarks/gpu_extrapolation.sh STAGE... (run from anywhere; paths are the configs' own,
# under runs/ in the repository). Environment: SEED (run.seed, default 0), LIMIT (seconds per training
# stage, default 300: timeout's SIGTERM makes hsa-train checkpoint and stop), STEPS1 (stage 1's steps,
# default the config's), STEPS2 (stage 2's final step, default 3000), LENGTHS (default 4K,64K,256K,1M),
# SAMPLES (default 20), EVAL_SEED (default 1), FROM (hsa2 only: start stage 2 from this stage-1 run folder,
# e.g. assets/extrapolation_gpu_512_seed0, copied into a fresh runs/extrapolation_gpu).
#   data          the four pass-key indexes named in the configs' headers (DRT's with --tail-jitter 62)
#   hsa1 / drt1   stage 1 (512 / 504 tokens, every chunk retrieved), a fresh run (its workdir removed first)
#   drt1r         DRT stage 1 resumed (runs/extrapolation_gpu_drt kept), on the config's data, until STEPS1
#   hsa2 / drt2   stage 2 (4096 / 4032 tokens), resuming the stage-1 workdir
#   evalhsa / evaldrt   hsa-eval passkey2 at LENGTHS, into WORKDIR/eval_step<step>
#   mk1 / mk2     the multi-key variant, continued from the stage-2 SWA+HSA run: runs/extrapolation_gpu_mk (a
#                 copy of runs/extrapolation_gpu when it does not exist yet) resumed on samples with 4 named
#                 pass keys, 2 of them asked, at 512 tokens (runs/xp_gpu_mk_512, until step STEPS1) or at 4K
#                 tokens (runs/xp_gpu_mk_4k, until step STEPS2)
#   evalmk        runs/extrapolation_gpu_mk on mk_passkey2 (4 named keys, one asked) and passkey2 at LENGTHS
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SEED=${SEED:-0} LIMIT=${LIMIT:-300} STEPS2=${STEPS2:-3000} LENGTHS=${LENGTHS:-4K,64K,256K,1M} SAMPLES=${SAMPLES:-20}
EVAL_SEED=${EVAL_SEED:-1}
HSA=(--config configs/extrapolation_gpu.yaml run.seed="$SEED" run.keep_checkpoints=1)
DRT=(--config configs/extrapolation_gpu_drt.yaml run.seed="$SEED" run.keep_checkpoints=1)

synthetic() {  # synthetic OUT SEQ_LEN SAMPLES [HAYSTACK_DOCS DOC_TOKENS TAIL_JITTER]
  python3 -m data_pipeline.synthetic "runs/$1" --task passkey --key-digits 2 --qa-repeats 2 --seq-len "$2" \
    --samples "$3" --haystack-docs "${4:-1}" --doc-tokens "${5:-65536}" --tail-jitter "${6:-0}"
}

train() {  # train WORKDIR ARGS...: hsa-train for at most LIMIT seconds, its log without the progress bar
  local workdir=$1; shift
  echo "+ hsa-train $*"
  timeout "$LIMIT" python3 -m train.main "$@" 2>&1 | grep -v -e '^W[0-9]' -e '^I[0-9]' -e 'train: *[0-9]*%'
  python3 - "$workdir/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
timed = [r for r in rows if "step_time_s" in r]
print("loss by step: " + " ".join(f"{r['step']}:{r['loss']:.4f}" for r in rows if "loss" in r and r["step"] % 250 == 0))
if timed:
    print(f"last logged step {timed[-1]['step']}: {timed[-1]['step_time_s'] * 1e3:.1f} ms per step")
PY
}

copy_run() {  # copy_run SRC DST: a fresh DST holding SRC's config.json and checkpoints, so that hsa-train resumes SRC's run
  rm -rf "$2" && mkdir -p "$2" && cp -r "$1/config.json" "$1/checkpoints" "$2/"
}

evaluate() {  # evaluate WORKDIR SEGMENT [TASKS]
  local step
  step=$(ls "$1/checkpoints" | grep -E '^[0-9]+$' | sort -n | tail -1)
  echo "+ hsa-eval --checkpoint $1 (step $step) --lengths $LENGTHS --samples $SAMPLES --seed $EVAL_SEED"
  python3 -m hsa_jax.cli.evaluate --checkpoint "$1" --haystack runs/xp_gpu_512/haystack --tokenizer bytes \
    --tasks "${3:-passkey2}" --lengths "$LENGTHS" --samples "$SAMPLES" --seed "$EVAL_SEED" --segment "$2" \
    --out "$1/eval_step$step" 2>&1 | grep -v -e '^W[0-9]' -e '^I[0-9]'
}

for stage in "$@"; do
  case $stage in
  data)
    synthetic xp_gpu_512 512 40000 4 1048576
    synthetic xp_gpu_4k 4096 20000
    synthetic xp_gpu_504j 504 40000 1 65536 62
    synthetic xp_gpu_4032j 4032 20000 1 65536 62
    ;;
  hsa1) rm -rf runs/extrapolation_gpu; train runs/extrapolation_gpu "${HSA[@]}" ${STEPS1:+steps=$STEPS1} ;;
  drt1) rm -rf runs/extrapolation_gpu_drt; train runs/extrapolation_gpu_drt "${DRT[@]}" ${STEPS1:+steps=$STEPS1} ;;
  hsa2)
    if [ -n "${FROM:-}" ]; then copy_run "$FROM" runs/extrapolation_gpu || exit 1; fi
    train runs/extrapolation_gpu "${HSA[@]}" data.index=runs/xp_gpu_4k/train data.eval_index=runs/xp_gpu_4k/train data.seq_len=4096 steps="$STEPS2" ;;
  drt1r) train runs/extrapolation_gpu_drt "${DRT[@]}" ${STEPS1:+steps=$STEPS1} ;;
  drt2) train runs/extrapolation_gpu_drt "${DRT[@]}" data.index=runs/xp_gpu_4032j/train data.eval_index=runs/xp_gpu_4032j/train data.seq_len=4032 steps="$STEPS2" ;;
  evalhsa) evaluate runs/extrapolation_gpu 16384 ;;
  mk1 | mk2)
    if [ "$stage" = mk1 ]; then data=xp_gpu_mk_512 len=512 samples=40000 last=${STEPS1:?mk1 needs STEPS1}
    else data=xp_gpu_mk_4k len=4096 samples=20000 last=$STEPS2; fi
    [ -e "runs/$data/train/manifest.json" ] || python3 -m data_pipeline.synthetic "runs/$data" --task mk_passkey \
      --keys 4 --qa-repeats 2 --key-digits 2 --seq-len "$len" --samples "$samples" --haystack-docs 1
    if [ ! -e runs/extrapolation_gpu_mk/checkpoints ]; then copy_run runs/extrapolation_gpu runs/extrapolation_gpu_mk || exit 1; fi
    train runs/extrapolation_gpu_mk "${HSA[@]}" data.index="runs/$data/train" data.eval_index="runs/$data/train" \
      data.seq_len="$len" steps="$last" workdir=runs/extrapolation_gpu_mk ;;
  evalmk) evaluate runs/extrapolation_gpu_mk 16384 mk_passkey2,passkey2 ;;
  evaldrt) evaluate runs/extrapolation_gpu_drt 16128 ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
