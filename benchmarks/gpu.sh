#!/usr/bin/env bash
# Train-step benchmarks on one GPU: four models in bfloat16 at 224 px, then ResNet-50 under
# one XLA GPU option at a time. Prints one table at the end.
#
# Usage (from anywhere; it runs in the repository root):
#   benchmarks/gpu.sh [--dry-run] [--install] [--wheels=DIR] [--out=DIR] [--only=REGEX]
#                     [--steps=N] [--warmup-steps=N] [--budget-s=S] [--python=PATH] [--cpu-smoke]
# Needs `pip install -e '.[cuda]'` done first, or pass --install to do it here; or, on a
# machine with JAX for its GPU but no package index, --wheels=DIR installs the wheels in DIR
# (no index, no dependencies) into a folder put first on PYTHONPATH (see "The device tool").
# --dry-run prints the plan and exits; --cpu-smoke runs the same plan on the CPU with
# ResNet-tiny at 32 px, to test this script (not the GPU) where there is no GPU.
#
# Every run is `python -m imagenet_jax bench train --mode=synthetic --json` (one random
# batch placed on the GPU once: the step alone, no input pipeline) with --steps=20
# --warmup_steps=5, bfloat16, one device (--config.mesh.data=1), and bench's own fresh
# compilation cache: compile_s is a real compile, autotuning included, and compile_warm_s
# a restarted run's, answered by that cache.
#
# Every run uses --config.dataset=synthetic: ImageNet's 1,000 classes and split sizes, no
# files (synthetic mode still asks the dataset for its class count).
#
# Expected time on one H200 (estimates, nothing here is measured yet): each run is about
# 10 s of start-up (imports, CUDA), the compile with autotuning, 25 steps and a ~1 s
# matmul calibration. ResNet-50 b256 ~70 s, ResNet-18 b256 ~40 s, AlexNet b512 ~30 s,
# VGG-16 b128 ~45 s, each ResNet-50 option ~70 s: about 6.5 min for all seven. The script
# stops starting runs when --budget-s (default 450 s) is spent, so it ends within 8 min.
#
# The device tool (one H200, 15 minutes a task, no package index; its image has Python
# 3.12, JAX 0.11.2 for CUDA 13, flax, optax, orbax, but no TensorFlow, ml_collections or
# clu; nothing on bench train's synthetic path imports TensorFlow). Here, first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 ml_collections==1.1.0 clu==0.0.12
# (2.5 MB, pure Python: the versions the suite passes with), then one `run` with
# carry [".whl"] and timeout_s 590:
#   benchmarks/gpu.sh --python=python3 --wheels=.whl --out=/tmp/gpu; \
#     tar czf "$OUT/gpu.tgz" -C /tmp gpu
# JAX stays the image's 0.11.2 (its jaxlib and CUDA plugin are too large to carry): the
# table's header names the version that ran.
#
# Predictions, to check against the table:
#   --xla_gpu_autotune_level=4  is the default in jaxlib 0.10.2 (`XLA_FLAGS=--help` prints
#       `--xla_gpu_autotune_level=4`; 5 is the only higher level, and it only discards
#       algorithms that fail the correctness check). So this row is a second baseline: its
#       distance from the first is the run-to-run noise the other two rows must beat.
#       Expect within 2%. The option worth a follow-up is =0 (autotuning off): a shorter
#       compile, slower convolutions.
#   --xla_gpu_enable_latency_hiding_scheduler=true  overlaps collectives with compute. One
#       device has no collectives (the 1-device ResNet-50 step compiles to 0 all-reduces),
#       so expect no change beyond noise; the schedule may move peak memory a little.
#   --xla_gpu_enable_command_buffer=  (empty: command buffers off) launches every kernel
#       from the host instead of replaying CUDA graphs. ResNet-50 at batch 256 has large
#       kernels the host stays ahead of, so expect 0-3% slower; the gap grows as kernels
#       shrink (ResNet-18, small batches, low resolution).

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START_S=$(date +%s)  # the budget counts from here: preflight included
MIN_RUN_S=30        # never start a run with less budget left than this
RUN_TIMEOUT_S=180   # one run never takes longer than this

# label|config file|global batch|XLA_FLAGS|estimated seconds on one H200
RUNS=(
  "resnet50|configs/resnet.py:resnet50|256||70"
  "resnet18|configs/resnet.py:resnet18|256||40"
  "alexnet|configs/alexnet.py|512||30"
  "vgg16|configs/vgg16.py|128||45"
  "resnet50+autotune4|configs/resnet.py:resnet50|256|--xla_gpu_autotune_level=4|70"
  "resnet50+lhs|configs/resnet.py:resnet50|256|--xla_gpu_enable_latency_hiding_scheduler=true|70"
  "resnet50-cmdbuf|configs/resnet.py:resnet50|256|--xla_gpu_enable_command_buffer=|70"
)

dry_run=0
install=0
wheels=""
cpu_smoke=0
only=""
steps=20
warmup_steps=5
budget_s=450
python="python"
out=""

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "gpu.sh: error: $*" >&2
  exit 2
}

is_count() {
  [[ "$1" =~ ^[0-9]+$ ]]
}

parse_args() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) dry_run=1 ;;
      --install) install=1 ;;
      --wheels=*) wheels="${arg#*=}" ;;
      --cpu-smoke) cpu_smoke=1 ;;
      --only=*) only="${arg#*=}" ;;
      --steps=*) steps="${arg#*=}" ;;
      --warmup-steps=*) warmup_steps="${arg#*=}" ;;
      --budget-s=*) budget_s="${arg#*=}" ;;
      --python=*) python="${arg#*=}" ;;
      --out=*) out="${arg#*=}" ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown argument '$arg'; valid: --dry-run --install --wheels=DIR --out=DIR --only=REGEX" \
               "--steps=N --warmup-steps=N --budget-s=S --python=PATH --cpu-smoke (see --help)" ;;
    esac
  done
  if ! is_count "$steps" || ((steps == 0)); then
    die "--steps must be a positive integer, got '$steps'"
  fi
  is_count "$warmup_steps" || die "--warmup-steps must be an integer >= 0, got '$warmup_steps'"
  is_count "$budget_s" || die "--budget-s must be a whole number of seconds, got '$budget_s'"
  if [[ -n "$wheels" ]]; then
    compgen -G "$wheels/*.whl" >/dev/null || die "--wheels=$wheels holds no .whl files"
    wheels="$(cd "$wheels" && pwd)"
  fi
  if [[ -n "$only" ]]; then
    # grep exits 2 on a bad pattern and 1 on no match: both are the user's to fix.
    local rc=0
    printf '%s\n' "${RUNS[@]%%|*}" | grep -Eq -- "$only" 2>/dev/null || rc=$?
    ((rc != 2)) || die "--only='$only' is not a valid extended regular expression"
    ((rc == 0)) || die "--only='$only' matches no run; runs: $(printf '%s ' "${RUNS[@]%%|*}")"
  fi
  out="${out:-${TMPDIR:-/tmp}/imagenet_jax_gpu_bench.$(date +%Y%m%d-%H%M%S)}"
}

selected_runs() {
  local run
  for run in "${RUNS[@]}"; do
    if [[ -z "$only" ]] || grep -Eq -- "$only" <<<"${run%%|*}"; then
      printf '%s\n' "$run"
    fi
  done
}

# The bench command of one run, one argument a line (read back with mapfile).
bench_command() {
  local config="$1" batch="$2"
  printf '%s\n' "$python" -m imagenet_jax bench train --mode=synthetic --json \
    "--steps=$steps" "--warmup_steps=$warmup_steps" \
    "--config=$config" --config.dataset=synthetic \
    --config.dtype=bfloat16 --config.mesh.data=1
  if ((cpu_smoke)); then
    printf '%s\n' --config.model=resnet_tiny --config.image_size=32 --config.batch_size=8
  else
    printf '%s\n' --config.image_size=224 "--config.batch_size=$batch"
  fi
}

print_plan() {
  local run label config batch flags estimate total=0 i=0
  local -a cmd
  echo "Plan: $(selected_runs | wc -l) run(s), steps=$steps warmup_steps=$warmup_steps," \
       "budget ${budget_s}s, results in $out"
  if ((cpu_smoke)); then
    echo "CPU smoke test: ResNet-tiny, 32 px, batch 8 on the CPU (tests the script, times nothing)"
  fi
  if ((install)); then
    echo "first: $python -m pip install -e '.[cuda]'"
  fi
  if [[ -n "$wheels" ]]; then
    echo "first: install $(compgen -G "$wheels/*.whl" | xargs -n1 basename | tr '\n' ' ')into $out/site"
  fi
  if ((!cpu_smoke)); then
    echo "preflight: check that JAX sees a GPU"
  fi
  while IFS='|' read -r label config batch flags estimate; do
    i=$((i + 1))
    total=$((total + estimate))
    mapfile -t cmd < <(bench_command "$config" "$batch")
    printf '%2d. %-20s ~%3ss  XLA_FLAGS=%s\n' "$i" "$label" "$estimate" "${flags:-<unset>}"
    printf '      %s\n' "${cmd[*]}"
  done < <(selected_runs)
  echo "Estimated total on one H200: ~${total}s (runs stop being started after ${budget_s}s)."
}

preflight() {
  if [[ -n "${XLA_FLAGS:-}" ]]; then
    echo "gpu.sh: ignoring XLA_FLAGS='$XLA_FLAGS' from the environment: each run sets its own" >&2
  fi
  if ((install)); then
    "$python" -m pip install -e '.[cuda]'
  fi
  mkdir -p "$out"
  if [[ -n "$wheels" ]]; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$out/site" "$wheels"/*.whl
    export PYTHONPATH="$out/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ((cpu_smoke)); then
    export JAX_PLATFORMS=cpu
  elif ! "$python" -c 'import jax, sys; sys.exit(jax.devices()[0].platform != "gpu")'; then
    die "JAX sees no GPU (jax.devices(): $("$python" -c 'import jax; print(jax.devices())' \
         2>/dev/null || echo 'jax does not import')); install with --install or" \
        "pip install -e '.[cuda]'"
  fi
}

# Runs one benchmark; appends "index<TAB>label<TAB>flags<TAB>status<TAB>json<TAB>log" to runs.tsv.
run_one() {
  local index="$1" label="$2" config="$3" batch="$4" flags="$5" time_left="$6"
  local stem json log status=ok rc=0
  local -a cmd
  stem="$out/$(printf '%02d' "$index")-$label"
  json="$stem.json"
  log="$stem.log"
  mapfile -t cmd < <(bench_command "$config" "$batch")
  local limit=$((time_left < RUN_TIMEOUT_S ? time_left : RUN_TIMEOUT_S))
  echo "[$(date +%H:%M:%S)] $index. $label (XLA_FLAGS=${flags:-<unset>}, limit ${limit}s)"
  if [[ -n "$flags" ]]; then
    XLA_FLAGS="$flags" timeout --kill-after=10 "$limit" "${cmd[@]}" >"$json" 2>"$log" || rc=$?
  else
    env -u XLA_FLAGS timeout --kill-after=10 "$limit" "${cmd[@]}" >"$json" 2>"$log" || rc=$?
  fi
  if ((rc == 124 || rc == 137)); then
    status="timed out after ${limit}s"
  elif ((rc != 0)); then
    status="exit $rc"
  fi
  if [[ "$status" != ok ]]; then
    echo "    failed: $status; the end of $log:"
    tail -n 3 "$log"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$index" "$label" "$flags" "$status" "$json" "$log" \
    >>"$out/runs.tsv"
}

run_all() {
  local label config batch flags estimate index=0 elapsed
  : >"$out/runs.tsv"
  while IFS='|' read -r label config batch flags estimate; do
    index=$((index + 1))
    elapsed=$(($(date +%s) - START_S))
    if ((budget_s - elapsed < MIN_RUN_S)); then
      echo "[$(date +%H:%M:%S)] $index. $label skipped: ${elapsed}s of the ${budget_s}s budget spent"
      printf '%s\t%s\t%s\t%s\t\t\n' "$index" "$label" "$flags" "skipped (budget)" >>"$out/runs.tsv"
      continue
    fi
    run_one "$index" "$label" "$config" "$batch" "$flags" $((budget_s - elapsed))
  done < <(selected_runs)
}

# One aligned table of every run, and results.jsonl: each result with its label and flags.
print_table() {
  "$python" - "$out/runs.tsv" "$out/results.jsonl" <<'EOF'
import json, sys

manifest, results_path = sys.argv[1], sys.argv[2]
rows, results, baselines = [], [], {}
header = ("run", "model", "dtype", "batch", "XLA flags", "images/s", "vs base", "step ms",
          "MFU", "compile s", "peak MB")
for line in open(manifest):
    index, label, flags, status, json_path, _log = line.rstrip("\n").split("\t")
    result = None
    if status == "ok":
        lines = [l for l in open(json_path) if l.startswith("{")]
        result = json.loads(lines[-1]) if lines else None
        status = status if result else "no JSON on stdout"
    if result is None:
        rows.append((f"{index}. {label}", status.upper(), "", "", flags or "default",
                     "", "", "", "", "", ""))
        continue
    results.append({"run": label, "xla_flags": flags, **result})
    key = (result["model"], result["global_batch_size"], result["image_size"])
    if not flags:
        baselines.setdefault(key, result["images_per_sec"])
    base = baselines.get(key)
    versus = f"{result['images_per_sec'] / base - 1:+.1%}" if base and flags else ""
    mfu = result.get("mfu")
    rows.append((f"{index}. {label}", result["model"], result["dtype"],
                 str(result["global_batch_size"]), flags or "default",
                 f"{result['images_per_sec']:,.0f}", versus, f"{result['step_time_ms']:.1f}",
                 "n/a" if mfu is None else f"{mfu:.1%}", f"{result['compile_s']:.1f}",
                 f"{result['peak_memory_mb']:,.0f}"))
with open(results_path, "w") as f:
    for result in results:
        f.write(json.dumps(result) + "\n")
widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
numeric = {3, 5, 6, 7, 8, 9, 10}
def fmt(row):
    return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()
if results:
    r = results[0]
    print(f"\n{r['device_kind']} ({r['platform']}), jax {r['jax_version']}, "
          f"{r['image_size']} px, synthetic input, steps={r['steps']} "
          f"warmup={r['warmup_steps']}; step ms is the median; MFU against the "
          f"{r['matmul_dtype']} matmul rate measured in each run.")
print(fmt(header))
print("  ".join("-" * w for w in widths))
for row in rows:
    print(fmt(row))
print(f"\nJSON per run: {results_path}")
EOF
}

main() {
  parse_args "$@"
  cd "$REPO_ROOT"
  print_plan
  if ((dry_run)); then
    return 0
  fi
  preflight
  run_all
  print_table
}

main "$@"
