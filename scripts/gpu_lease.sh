#!/usr/bin/env bash
# One GPU lease, run as-is: `pytest tests/gpu` and issue 13's benchmarks on the Llama-3-8B shape
# (random bf16 weights, --load-format dummy), each stage under a time limit, ~9 minutes in all
# on one H100 / H200.
#
# Prepare on a machine with network, from the repo root, once:
#     make gpu-wheels     # -> .gpu/wheels (fastapi, uvicorn, pydantic, ... for Python 3.12 x86-64)
#                         #    .gpu/models/llama3-8b-shape (config + tokenizer, no weights)
# Run on the GPU machine from the repo root, carrying the ignored folder .gpu (6.5 MB), e.g. with
# the device tool: run(command="bash scripts/gpu_lease.sh", carry=[".gpu"], timeout_s=600).
# The GPU image has Python 3.12, torch, triton and transformers but no network and no fastapi:
# the project and the wheels are installed with `pip --no-deps --target` into $SITE.
#
# What comes back under $OUT (8 files; the device tool returns at most 8):
#   gpu_lease.log      everything printed, the elapsed time of every stage, a summary at the end
#   latency.json       bench latency, batch 1, 512 in, 128 out
#   offline_hf.json    bench offline vs transformers generate on the same GPU, 128 prompts of 512-1024, 128 out
#   capacity.jsonl     32 prompts x 8192 in, 512 out, a KV pool of 8 full requests: full, then 25% full heads
#   serve.json         bench serve at 64 concurrent against `headwise serve`
#   serve_offline.json bench offline on serve's workload (serve's throughput / this = serving efficiency)
#   server.log         the server's log
#   load.json          streaming load of a random 7.4B bf16 safetensors checkpoint: seconds, host RSS peak
#
#   STAGES=latency,capacity bash scripts/gpu_lease.sh    # a subset (pytest,latency,offline,capacity,serve,load)
#   BUDGET_S=300 bash scripts/gpu_lease.sh               # later stages get what is left of 300 s
#   bash scripts/gpu_lease.sh --cpu-smoke                # the same stages on the CPU: tiny model, a few
#                                                        # tokens, 1-3 min on 2 cores (not run by make test)
set -uo pipefail

SMOKE=0
case "${1:-}" in
  --cpu-smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_lease.sh [--cpu-smoke]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
START=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=$(mktemp -d /tmp/gpu-lease.XXXXXX)
SITE=${SITE:-$WORK/site}
if [[ -z "${OUT:-}" ]]; then OUT=$WORK/out; fi
mkdir -p "$OUT" "$SITE"
exec > >(tee -a "$OUT/gpu_lease.log") 2>&1

if (( SMOKE )); then
  PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
  BUDGET_S=${BUDGET_S:-400}
else
  PY=${PYTHON:-python3}
  BUDGET_S=${BUDGET_S:-540}
fi
STAGES=${STAGES:-pytest,latency,offline,capacity,serve,load}
DEADLINE=$((START + BUDGET_S))
H=("$PY" -m headwise.clients.cli)
SERVER_PID=

cleanup() {
  if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
}
trap cleanup EXIT

elapsed() { echo $(( $(date +%s) - START )); }

wants() { [[ ",$STAGES," == *",$1,"* ]]; }

# run NAME CAP_S OUTFILE CMD...: CMD under the smaller of CAP_S and what is left of the budget;
# its stdout goes to $OUT/OUTFILE unless OUTFILE is "-"
run_stage() {
  local name=$1 cap=$2 out=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 15 )); then echo "== $name: skipped, the ${BUDGET_S} s budget is spent"; return 1; fi
  local limit=$(( cap < left ? cap : left )) t0 rc
  t0=$(date +%s)
  echo "== $name (limit ${limit} s, at ${SECONDS} s): ${*}"
  if [[ "$out" == "-" ]]; then
    timeout -k 10 "$limit" "$@"; rc=$?
  else
    timeout -k 10 "$limit" "$@" >> "$OUT/$out"; rc=$?
  fi
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s$([[ $rc == 124 ]] && echo ' (time limit)')"
  return $rc
}

echo "== gpu_lease.sh $([[ $SMOKE == 1 ]] && echo '--cpu-smoke ')stages $STAGES, budget ${BUDGET_S} s, out $OUT"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo "${HEADWISE_COMMIT:-unknown (set HEADWISE_COMMIT)}")"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# -- install: the project and the carried wheels, no dependencies resolved, nothing fetched ------
WHEELS=()  # cp312 wheels: only for the GPU image (the CPU smoke uses the .venv's packages)
if (( ! SMOKE )) && compgen -G ".gpu/wheels/*.whl" >/dev/null; then WHEELS=(.gpu/wheels/*.whl); fi
run_stage install 180 - "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
  --target "$SITE" . "${WHEELS[@]}" || { echo "install failed"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sys, torch, transformers, headwise.engine.weights as w
print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__,
      '| cuda', torch.cuda.is_available(), '| headwise from', w.__file__)"

# -- workloads ---------------------------------------------------------------------------------
if (( SMOKE )); then
  MODEL=$WORK/tiny
  "$PY" - "$MODEL" <<'EOF'
import sys
from pathlib import Path
from tests.tiny_model import write_tiny_llama
d = Path(sys.argv[1])
write_tiny_llama(d)
for f in d.glob("*.safetensors"):  # dummy weights: nothing may read a checkpoint
    f.unlink()
EOF
  ENGINE=(--model "$MODEL" --load-format dummy --dtype float32 --device cpu)
  LAT=(--batch-size 1 --input-len 16 --output-len 4 --num-iters-warmup 1 --num-iters 1 --max-model-len 64
       --max-num-seqs 1)
  OFF=(--num-prompts 4 --input-len 16-32 --output-len 4 --max-num-seqs 2 --max-model-len 64 --kv-cache-mb 16)
  CAP_IN=256 CAP_OUT=16 CAP_N=4 CAP_FIT=2 CAP_SINK=4 CAP_RECENT=32
  SRV_N=8 SRV_CONCURRENCY=4 SRV_IN=32 SRV_OUT=8
  SRV_ENGINE=(--max-num-seqs 4 --max-model-len 64 --kv-cache-mb 16)
  LOAD_CONFIG=
else
  MODEL=.gpu/models/llama3-8b-shape
  [[ -f $MODEL/config.json ]] || { echo "$MODEL/config.json is missing: run make gpu-wheels and carry .gpu"; exit 1; }
  ENGINE=(--model "$MODEL" --load-format dummy --dtype bfloat16 --device cuda)
  # --max-num-seqs 1: only the batch-1 decode graph is captured
  LAT=(--batch-size 1 --input-len 512 --output-len 128 --num-iters-warmup 1 --num-iters 3 --max-model-len 640
       --max-num-seqs 1 --kv-cache-mb 2048)
  OFF=(--num-prompts 128 --input-len 512-1024 --output-len 128 --max-num-seqs 64 --hf-batch-size 64
       --max-num-batched-tokens 8192 --max-model-len 1152 --kv-cache-mb 12288)
  CAP_IN=8192 CAP_OUT=512 CAP_N=32 CAP_FIT=8 CAP_SINK=64 CAP_RECENT=256
  SRV_N=128 SRV_CONCURRENCY=64 SRV_IN=512 SRV_OUT=128
  SRV_ENGINE=(--max-num-seqs 64 --max-num-batched-tokens 8192 --max-model-len 640 --kv-cache-mb 12288)
  LOAD_CONFIG=$MODEL
fi

if wants pytest; then
  run_stage pytest 150 - "$PY" -m pytest tests/gpu -q -p no:cacheprovider
fi

if wants latency; then
  run_stage latency 75 - "${H[@]}" bench latency "${ENGINE[@]}" "${LAT[@]}" --json "$OUT/latency.json"
fi

if wants offline; then
  run_stage offline 150 offline_hf.json "${H[@]}" bench offline "${ENGINE[@]}" "${OFF[@]}" --baseline hf --json
fi

if wants capacity; then
  # a KV pool that holds CAP_FIT full requests: layers x KV heads x blocks of one request x CAP_FIT
  read -r NUM_BLOCKS PLAN < <("$PY" - "$MODEL" "$WORK/plan25.json" $CAP_IN $CAP_OUT $CAP_FIT $CAP_SINK $CAP_RECENT <<'EOF'
import sys
from pathlib import Path
from headwise.engine.loader import read_config
from headwise.kvcache.plan_build import plan_from_scores, plan_source
from headwise.kvcache.plans import HeadSpec, save_plan
model, out, n_in, n_out, fit, sink, recent = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
shape = read_config(Path(model)).shape
blocks = shape.layers * shape.kv_heads * -(-(n_in + n_out) // 16) * fit
# every 4th KV head stays full (25%), the others keep sink + recent: spread evenly over layers
scores = [[1.0 if (layer * shape.kv_heads + h) % 4 == 0 else 0.0 for h in range(shape.kv_heads)]
          for layer in range(shape.layers)]
plan = plan_from_scores(shape, scores, 0.25, HeadSpec("window", sink=sink, recent=recent), "full25",
                        plan_source("gpu_lease", {"every": 4, "sink": sink, "recent": recent}))
save_plan(plan, out)
print(blocks, out)
EOF
  )
  [[ -n "${PLAN:-}" ]] || { echo "capacity: could not size the pool or build the plan"; exit 1; }
  echo "capacity: pool of $NUM_BLOCKS blocks ($CAP_FIT full requests of $CAP_IN + $CAP_OUT tokens), plan $PLAN"
  CAP=("${H[@]}" bench offline "${ENGINE[@]}" --num-prompts $CAP_N --input-len $CAP_IN --output-len $CAP_OUT
       --num-blocks "$NUM_BLOCKS" --max-num-seqs $CAP_N --max-num-batched-tokens $CAP_IN
       --max-model-len $((CAP_IN + CAP_OUT)) --plan full25="$PLAN" --json)
  run_stage capacity-full 150 capacity.jsonl "${CAP[@]}"
  run_stage capacity-25 110 capacity.jsonl "${CAP[@]}" --kv-plan full25
fi

if wants serve; then
  if "$PY" -c "import fastapi, uvicorn" 2>/dev/null; then
    PORT=${PORT:-8011}
    t0=$(date +%s)
    "${H[@]}" serve "${ENGINE[@]}" "${SRV_ENGINE[@]}" --port "$PORT" --log-level warning > "$OUT/server.log" 2>&1 &
    SERVER_PID=$!
    up=0
    for _ in $(seq 1 120); do
      if "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health')" 2>/dev/null; then
        up=1; break; fi
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 1
    done
    echo "server: $([[ $up == 1 ]] && echo up || echo 'did not come up') after $(( $(date +%s) - t0 )) s"
    if (( up )); then
      run_stage serve 150 - "${H[@]}" bench serve --url "http://127.0.0.1:$PORT" --num-prompts $SRV_N \
        --concurrency $SRV_CONCURRENCY --input-len $SRV_IN --output-len $SRV_OUT --result-json "$OUT/serve.json"
    fi
    cleanup; SERVER_PID=
    # the same requests through the engine alone: random ids of the same lengths, same engine flags
    run_stage serve-offline 90 serve_offline.json "${H[@]}" bench offline "${ENGINE[@]}" "${SRV_ENGINE[@]}" \
      --num-prompts $SRV_N --input-len $SRV_IN --output-len $SRV_OUT --json
  else
    echo "== serve: skipped, fastapi / uvicorn are not importable (make gpu-wheels, carry .gpu)"
  fi
fi

if wants load; then
  if [[ -n "$LOAD_CONFIG" ]]; then
    CKPT=$WORK/ckpt
    run_stage load-write 150 - "$PY" scripts/measure_load.py write-checkpoint --config "$LOAD_CONFIG" \
      --out "$CKPT" --shard-gb 5 &&
      run_stage load 90 load.json "$PY" scripts/measure_load.py measure --model "$CKPT" --dtype bfloat16 \
        --device cuda
    rm -rf "$CKPT"
  else
    CKPT=$WORK/ckpt-smoke
    "$PY" - "$CKPT" <<'EOF'
import sys
from pathlib import Path
from tests.tiny_model import write_tiny_llama
write_tiny_llama(Path(sys.argv[1]))
EOF
    run_stage load 60 load.json "$PY" scripts/measure_load.py measure --model "$CKPT" --dtype float32 --device cpu
  fi
fi

# -- summary -----------------------------------------------------------------------------------
echo "== summary after $(elapsed) s"
"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])


def read(name):
    """A stage's JSON (a list of lines for .jsonl), None if the stage did not finish."""
    try:
        text = (out / name).read_text()
        return [json.loads(x) for x in text.splitlines() if x.strip()] if name.endswith(".jsonl") else json.loads(text)
    except (OSError, json.JSONDecodeError):
        return None


lat = read("latency.json")
if lat:
    b = lat["step_breakdown_ms"]
    print(f"batch-{lat['batch_size']} decode: {lat['decode_tok_s']['mean']:.1f} tok/s "
          f"({lat['decode_ms_per_step']['mean']:.2f} ms/step), prefill {lat['prefill_s']['mean']:.3f} s, "
          f"output {lat['output_tok_s']['mean']:.1f} tok/s; one step: "
          + ", ".join(f"{k} {v:.2f} ms" for k, v in b.items()))
off = read("offline_hf.json")
if off:
    print(f"offline {off['num_prompts']} prompts: headwise {off['engine_tok_s']} tok/s ({off['engine_s']} s, peak "
          f"{off['peak_num_running']} running), transformers {off.get('hf_tok_s')} tok/s on {off.get('hf_device')}: "
          f"{off.get('speedup')}x")
cap = read("capacity.jsonl") or []
for c in cap:
    print(f"capacity {c['num_prompts']} x {c['input_len']} + {c['output_len']}, plan "
          f"{'full' if c is cap[0] else 'full25'}: {c['engine_s']} s, peak {c['peak_num_running']} running")
if len(cap) == 2:
    print(f"capacity: the 25% plan is {cap[0]['engine_s'] / cap[1]['engine_s']:.2f}x faster than full")
srv, srv_off = read("serve.json"), read("serve_offline.json")
if srv:
    line = (f"serve at {srv['config'].get('concurrency')} concurrent: {srv['output_throughput']:.1f} output tok/s, "
            f"TTFT p50 {srv['median_ttft_ms']:.0f} ms, TPOT p50 {srv['median_tpot_ms']:.1f} ms")
    if srv_off:
        line += (f"; offline {srv_off['engine_tok_s']} tok/s: serving reaches "
                 f"{100 * srv['output_throughput'] / srv_off['engine_tok_s']:.0f}%")
    print(line)
load = read("load.json")
if load:
    print(f"load {load['weights_mb'] / 1024:.1f} GiB of weights ({load['dtype']}, {load['device']}): {load['load_s']} s, "
          f"host peak {load['peak_over_before_mb'] / 1024:.2f} GiB over the process before loading "
          f"({load['peak_over_before_mb'] / load['weights_mb']:.2f}x the weights)")
EOF
ls -la "$OUT"
echo "== gpu_lease.sh done in $(elapsed) s"
