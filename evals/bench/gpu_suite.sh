#!/usr/bin/env bash
# The GPU suite: every GPU figure vtoken owes, in one command, on one CUDA GPU, in at most 17.5 minutes of wall time.
#
#   evals/gpu_suite.sh [--device cuda|cpu] [--smoke] [--out DIR] [--wheelhouse DIR] [--budget SECONDS (1010)]
#                      [--install|--no-install] [--parts REGEX]
#
# 1. installs the wheels of --wheelhouse (built beforehand by evals/bench/build_wheelhouse.sh; default on CUDA) into a
#    scratch folder, and runs vtoken from this checkout (no build, no network);
# 2. checks the versions (transformers inside vtoken's range, CUDA, Triton) and stops if it must not measure;
# 3. runs `pytest -m gpu` (every Triton kernel vs its reference in fp16 and bf16, fp16 invariants), then the
#    measurements, each part with a time share: a part that overruns is stopped with a message and the rest go on;
# 4. writes JSON + a markdown table per benchmark, logs and README.md (device named) under --out.
# --parts REGEX runs only the parts whose whole name matches (the environment check always runs) and keeps the other
# parts' rows in --out: on one H100 the whole suite needs three device calls of at most 420 s each, e.g.
#   --budget 400 --parts 'pytest_gpu|bench_llava15_b.*'
#   --budget 400 --parts 'bench_(llava_next|qwen25|dit|kernels|compiled_llava15_b1|compiled_in_llm_llava15_b1)'
#   --parts 'bench_(llava15|llava_next)_(sdpa_flash|fa2)|bench_vit'   (if time is left)
#
# --device cpu --smoke is the dry run: tiny shapes, Triton through the interpreter, no figure is a GPU measurement.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD

DEVICE=cuda SMOKE=0 OUT=docs/results/gpu WHEELS=.wheelhouse BUDGET= INSTALL=auto PARTS=
# LLaVA methods of the main table
METHODS=${VTOKEN_SUITE_METHODS:-"todre random pool attn_topk divprune transprune corematching"}

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --device) DEVICE=${2:-}; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --out) OUT=${2:-}; shift 2 ;;
    --wheelhouse) WHEELS=${2:-}; shift 2 ;;
    --budget) BUDGET=${2:-}; shift 2 ;;
    --install) INSTALL=yes; shift ;;
    --no-install) INSTALL=no; shift ;;
    --parts) PARTS=${2:-}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_suite.sh: error: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
case $DEVICE in cuda|cpu) ;; *) echo "gpu_suite.sh: error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
# On a GPU 1010 s: the parts' shares (about 1.5 times what each took on an H100; the static-cache and compiled parts
# and the shares of the 10-repeat LLaVA parts are estimates); a stopped part's 10 s grace and the report keep the run
# within 17.5 minutes. The CPU dry run (Triton's interpreter, a shared machine) gets every share and the budget four
# times over.
SCALE=1
[ "$DEVICE" = cpu ] && SCALE=4
BUDGET=${BUDGET:-$((1010 * SCALE))}
case $BUDGET in *[!0-9]*) echo "gpu_suite.sh: error: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

PY=${PYTHON:-python3}
# PYTHONSAFEPATH: `python -m` must not put the checkout's root first on sys.path, where ./vtoken (the core package
# alone) would shadow the assembled package below
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME=${HF_HOME:-$(mktemp -d /tmp/vtoken-hf.XXXXXX)}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT/logs"
if [ -z "$PARTS" ]; then
  rm -f "$OUT/parts.tsv"
elif [ -f "$OUT/parts.tsv" ]; then  # keep the rows of the parts this run leaves alone
  grep -v -E "^(environment|$PARTS)"$'\t' "$OUT/parts.tsv" > "$OUT/parts.keep" || true
  mv "$OUT/parts.keep" "$OUT/parts.tsv"
fi
SITE=$(mktemp -d /tmp/vtoken-suite.XXXXXX)

record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUT/parts.tsv"; }

# part NAME SHARE COMMAND...: run COMMAND for at most SHARE seconds (less if the suite's budget runs out first)
part() {
  local name=$1 share=$(($2 * SCALE)); shift 2
  if [ -n "$PARTS" ] && [ "$name" != environment ] && ! [[ $name =~ ^($PARTS)$ ]]; then
    return 0
  fi
  local left=$((DEADLINE - $(date +%s)))
  if [ "$left" -lt 5 ]; then
    echo "=== $name: skipped, the suite's ${BUDGET}s are spent"
    record "$name" "skipped: the suite's ${BUDGET}s were spent" 0 "$share"
    return 1
  fi
  [ "$share" -gt "$left" ] && share=$left
  echo "=== $name (share ${share}s; ${left}s of the suite left)"
  local t0 rc status
  t0=$(date +%s)
  timeout --kill-after=10 "$share" "$@" 2>&1 | tee "$OUT/logs/$name.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124|137) status="stopped: overran its ${share}s share"
             echo "=== $name STOPPED: it overran its ${share}s share; its figures are missing, the suite goes on" ;;
    *) status="failed (exit $rc; see logs/$name.log)" ;;
  esac
  record "$name" "$status" "$(($(date +%s) - t0))" "$share"
  return "$rc"
}

# -- 1. environment: carried wheels, then vtoken from this checkout ----------------------------------------------------
WHEEL_SITE=
if [ "$INSTALL" = yes ] || { [ "$INSTALL" = auto ] && [ "$DEVICE" = cuda ]; }; then
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    echo "=== installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE/wheels" \
        "$WHEELS"/*.whl; then
      echo "gpu_suite.sh: error: installing the wheelhouse failed; nothing was measured" >&2
      exit 1
    fi
    WHEEL_SITE=$SITE/wheels
  else
    echo "note: no wheels in $WHEELS (evals/bench/build_wheelhouse.sh builds them); using the installed packages"
  fi
fi
# vtoken's package layout (pyproject's package-dir: vtoken.adapters = adapters/, ...) as links: nothing to build
mkdir -p "$SITE/src/vtoken"
for entry in "$REPO"/vtoken/*; do ln -s "$entry" "$SITE/src/vtoken/"; done
for sub in adapters kernels evals; do ln -s "$REPO/$sub" "$SITE/src/vtoken/$sub"; done
export PYTHONPATH="$SITE/src${WHEEL_SITE:+:$WHEEL_SITE}${PYTHONPATH:+:$PYTHONPATH}"

# -- 2. versions, before anything is measured -------------------------------------------------------------------------
if ! part environment 30 "$PY" -m vtoken.evals.bench.gpu_suite env --device "$DEVICE" --out "$OUT" \
    ${WHEEL_SITE:+--site "$WHEEL_SITE"}; then
  echo "gpu_suite.sh: error: the environment check failed (see above); nothing was measured" >&2
  "$PY" -m vtoken.evals.bench.gpu_suite report --out "$OUT" > /dev/null
  exit 1
fi

# -- 3. tests, then measurements --------------------------------------------------------------------------------------
VT=("$PY" -m vtoken.cli)
METHOD_ARGS=()
for m in $METHODS; do METHOD_ARGS+=(--method "$m"); done
if [ "$SMOKE" = 1 ]; then
  "$PY" -m vtoken.evals.bench.gpu_suite smoke-models --out "$SITE/models"
  LLAVA=(--model "$SITE/models/llava" --random-weights)
  NEXT=(--model "$SITE/models/llava_next" --random-weights)
  QWEN=(--model tiny-qwen2.5-vl)
  TIMING=(--repeats 1 --warmup 0 --new-tokens 2)
  KEEP=16  # of the smoke model's 64 visual tokens
  BATCH=4
  VIT=(--models vit_tiny_patch16_224 --batch-size 2 --reps 1 --warmup 0)
  DIT=(--shape tiny --reps 1)
  KERNELS=(--smoke --reps 1)
else
  LLAVA=(--model llava-1.5-7b)
  NEXT=(--model llava-next-7b)
  QWEN=(--model qwen2.5-vl-7b)
  TIMING=(--repeats 10 --warmup 3 --new-tokens 8)  # CUDA events; median and quartiles of 10 after compile/autotune
  KEEP=64
  BATCH=16
  VIT=(--models vit_large_patch14_clip_336 --batch-size 32 --reps 3 --warmup 1)
  DIT=(--shape gpu --reps 5)
  KERNELS=(--reps 20)
fi
if [ "$DEVICE" = cuda ]; then
  HALF=(--dtype float16)
  COMPILED=(--cache static --compile cudagraphs)
  FLASH_NAME=$("$PY" -c "import importlib.util as u; print('fa2' if u.find_spec('flash_attn') else 'sdpa_flash')")
else  # the dry run only checks the commands: SDPA's math backend stands in for the flash one, Dynamo alone for CUDA graphs
  HALF=(--dtype float32)
  COMPILED=(--cache static --compile eager)
  FLASH_NAME=sdpa_math
fi
case $FLASH_NAME in
  fa2) FLASH=(--attn flash_attention_2) ;;
  sdpa_flash) FLASH=(--attn sdpa --sdpa-kernel flash)
              echo "note: flash-attn is not installed; FlashAttention-2 is measured as PyTorch SDPA's flash backend" ;;
  *) FLASH=(--attn sdpa --sdpa-kernel math) ;;
esac
BENCH=("${VT[@]}" bench --device "$DEVICE" "${HALF[@]}" --quiet)

PYTEST_ENV=()
[ "$DEVICE" = cpu ] && PYTEST_ENV=(env VTOKEN_GPU_TESTS_ON_CPU=1)
part pytest_gpu 90 "${PYTEST_ENV[@]}" "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider \
  --junitxml="$OUT/pytest_gpu.xml"
part bench_llava15_b1 110 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" --keep "$KEEP" --batch 1 "${METHOD_ARGS[@]}" \
  --json "$OUT/bench_llava15_b1.json"
# the fast Hugging Face path: a static cache, whose decode steps generate() compiles (CUDA graphs): todre as released
# (stage 2 prunes inside the LLM) and without stage 2, and the boundary baselines
part bench_llava15_b1_static 120 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" --keep "$KEEP" --batch 1 --cache static \
  --method todre --method todre:stage2=false --method random --method pool --method divprune \
  --json "$OUT/bench_llava15_b1_static.json"
part bench_llava15_b$BATCH 160 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" --keep "$KEEP" --batch "$BATCH" \
  "${METHOD_ARGS[@]}" --json "$OUT/bench_llava15_b$BATCH.json"
part bench_llava_next 50 "${BENCH[@]}" "${NEXT[@]}" "${TIMING[@]}" --keep 0.1 --batch 1 \
  --method todre:keep=0.1 --method todre:keep=0.25 --json "$OUT/bench_llava_next.json"
part bench_llava15_$FLASH_NAME 45 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" "${FLASH[@]}" --keep "$KEEP" --batch 1 \
  --method todre --json "$OUT/bench_llava15_$FLASH_NAME.json"
part bench_llava_next_$FLASH_NAME 45 "${BENCH[@]}" "${NEXT[@]}" "${TIMING[@]}" "${FLASH[@]}" --keep 0.1 --batch 1 \
  --method todre --json "$OUT/bench_llava_next_$FLASH_NAME.json"
part bench_qwen25 50 "${BENCH[@]}" "${QWEN[@]}" "${TIMING[@]}" --keep 0.25 --batch 1 --method todre \
  --method random --method pool --json "$OUT/bench_qwen25.json"
part bench_vit 50 "${VT[@]}" bench-vit --device "$DEVICE" --dtype bf16 "${VIT[@]}" --out "$OUT/bench_vit"
part bench_dit 35 "${VT[@]}" bench-dit --device "$DEVICE" --top-p 0.9 "${DIT[@]}" --out "$OUT/bench_dit"
part bench_kernels 40 "${VT[@]}" bench-kernels --device "$DEVICE" "${KERNELS[@]}" --out "$OUT/bench_kernels"
# batch 1 without most of the host's launches: the vision tower and the language model compiled once with CUDA graphs,
# every call of them a replay (the selection between them stays eager); last, so that its compile cannot starve the
# rest
part bench_compiled_llava15_b1 150 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" --keep "$KEEP" --batch 1 "${COMPILED[@]}" \
  --method todre:stage2=false --method random --method divprune --json "$OUT/bench_compiled_llava15_b1.json"
# the same for pruning inside the LLM, by a fixed count (FastV) and by ToDRE as released (its stage 2 masks the tokens
# it drops inside the graph): each prefill, pruning included, replays as one graph; a part of its own, so that the
# second and third sets of graphs to capture cannot cost the first part its figures
part bench_compiled_in_llm_llava15_b1 120 "${BENCH[@]}" "${LLAVA[@]}" "${TIMING[@]}" --keep "$KEEP" --batch 1 \
  "${COMPILED[@]}" --method attn_topk --method todre --json "$OUT/bench_compiled_in_llm_llava15_b1.json"

# -- 4. report --------------------------------------------------------------------------------------------------------
"$PY" -m vtoken.evals.bench.gpu_suite report --out "$OUT" > "$OUT/logs/report.log" || echo "the report failed" >&2
rm -rf "$SITE"
echo "=== GPU suite: $(($(date +%s) - START))s of ${BUDGET}s; results in $OUT (README.md)"
cut -f1,2 "$OUT/parts.tsv" | sed 's/\t/: /'
! grep -qv $'\tok\t' "$OUT/parts.tsv"
