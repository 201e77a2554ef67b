#!/usr/bin/env bash
# One-shot device check (docs/gpu.md): set up the project on a fresh GPU machine, run the `cuda`
# tests, `attnbench bench` at 197, 785 and 3137 tokens in float32 and bfloat16, and a
# two-configuration sweep in bfloat16 (experiments/device-check.yaml), within 8 minutes.
#
#   scripts/device-check.sh [FOLDER]     logs, result rows, report and plots go to FOLDER,
#                                        else to $OUT, else to ./device-check
#
# ATTNBENCH_DEVICE_CHECK_SETUP=0 skips the setup command and uses the Python environment already
# active (a development checkout). Without a CUDA device it runs the CPU part (setup, the cuda
# tests, which report themselves skipped, a small bench in both precisions and the same sweep on
# CPU), says "no CUDA device" and exits 0. Exit 1: a step failed (see FOLDER/steps.txt and logs/).
set -uo pipefail
cd "$(dirname "$0")/.."

out="${1:-${OUT:-device-check}}"
mkdir -p "$out/logs" && out="$(cd "$out" && pwd)"
budget_s=480                       # 8 minutes for everything, the setup included
deadline=$((SECONDS + budget_s))
failed=()
: >"$out/steps.txt"

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the deadline), log to logs/NAME.log
step() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) started=$SECONDS rc
    shift 2
    if [ "$left" -le 5 ]; then
        echo "$name: not run, the $budget_s s budget is spent" | tee -a "$out/steps.txt"
        failed+=("$name")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s)"
    timeout --kill-after=10 "$limit" "$@" >"$out/logs/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
    [ "$rc" -eq 0 ] || { failed+=("$name"); tail -n 5 "$out/logs/$name.log"; }
    return "$rc"
}

if [ "${ATTNBENCH_DEVICE_CHECK_SETUP:-1}" != 0 ]; then
    echo "== setup (the README's setup command)"
    started=$SECONDS
    if ! { python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]"; } >"$out/logs/setup.log" 2>&1; then
        echo "setup: failed after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
        tail -n 20 "$out/logs/setup.log"
        exit 1
    fi
    echo "setup: exit 0 after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
fi

python - >"$out/environment.txt" 2>&1 <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA build", torch.version.cuda)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory // 2**20, "MiB")
else:
    print("no CUDA device")
PY
cat "$out/environment.txt"
has_cuda=$(python -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)

attnbench() { python -m attnbench.cli "$@"; }
results="$out/results"
step cuda-tests 200 python -m pytest -m cuda -p no:cacheprovider -q -rs tests/test_cuda.py
if [ "$has_cuda" = 1 ]; then
    for dtype in float32 bfloat16; do
        step "bench-$dtype" 150 attnbench bench --device cuda --dtype "$dtype" --tokens 197,785,3137 --batch 32 \
            --repeats 2 --samples 10 --out "$results"
    done
    step sweep 120 attnbench sweep experiments/device-check.yaml --device cuda --results "$results"
else
    # The CPU part: the same commands at a size a CPU runs in seconds.
    for dtype in float32 bfloat16; do
        step "bench-$dtype-cpu" 90 attnbench bench --device cpu --dtype "$dtype" --tokens 65 \
            --variants softmax,linear-angular,castling --repeats 1 --samples 2 --warmup 1 --ops fast --no-memory \
            --out "$results"
    done
    # the same experiment, cut to 3 training steps and 2 timing repeats (a CPU runs a step in 0.1-1 s)
    python - "$out/device-check-cpu.yaml" <<'PY'
import sys, yaml
experiment = yaml.safe_load(open("experiments/device-check.yaml"))
experiment["train"]["max_steps"] = 3
experiment["measure"].update(repeats=2, memory=False)
yaml.safe_dump(experiment, open(sys.argv[1], "w"), sort_keys=False)
PY
    step sweep-cpu 150 attnbench sweep "$out/device-check-cpu.yaml" --device cpu --results "$results"
fi
step report 60 attnbench report --results "$results" --plots "$out/plots" --format markdown --out "$out/report.md"

echo "logs, rows, report and plots: $out"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
if [ "$has_cuda" != 1 ]; then
    echo "no CUDA device: ran the CPU part only (the cuda tests report themselves skipped); the GPU steps need a machine where torch.cuda.is_available()"
fi
exit 0
