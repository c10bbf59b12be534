#!/usr/bin/env bash
# The GPU session's single entry point: one PART per device command, each within about 9 minutes, installs included.
#
#   SAMBA_COMMIT=<commit> bash benchmarks/gpu_session.sh PART
#
#   kernels    builds mamba-ssm's selective scan in the background (about 2.5 minutes) while tests/gpu runs
#              (GPU_TESTS=0: not), then the kernels suite in the time left
#   generate   the generate suite: its cells in order of priority, as many as fit
#   long       the prefill suite, then train, then memory
#   prefill    the prefill suite alone
#   lora       the lora suite: examples/lora.py on samba-421m, LoRA (fp32, bf16 base) and QLoRA, a process each
#   tests      tests/gpu alone
#
# Carry, in the device call (both are ignored by git): .whl (python -m benchmarks.wheels prepare) and, for kernels,
# .mamba_ssm_src (bash benchmarks/fetch_mamba_ssm.sh). SAMBA_COMMIT stamps the results where the copy has no .git.
# Optional: PART_SECONDS (default 540) bounds the part; CASES_<suite> picks cases (CASES_generate=b1-64k,b1-128k).
# Output in $OUT: PART-results.tar.gz (the part's files of benchmarks/results/, to extract in the repository root),
# PART-logs.tar.gz, PART-summary.txt; the summary is also printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash benchmarks/gpu_session.sh kernels|generate|long|prefill|lora|tests}
start=$(date +%s)
limit=${PART_SECONDS:-540}
out=${OUT:-/tmp/samba-gpu-session}
logs=$(mktemp -d)
mkdir -p "$out"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site:$PWD/src:$PWD/kernels:$PWD/conversion
export PATH=/tmp/site/bin:$PATH  # ninja, for torch.utils.cpp_extension
python3 -m benchmarks.wheels verify /tmp/site || exit 1
export SAMBA_COMMIT=${SAMBA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
suites=()

left() {  # seconds left of the part, less 25 s for the archives and the summary (at least 1: timeout 0 never stops)
    local seconds=$((start + limit - $(date +%s) - 25))
    echo $((seconds > 1 ? seconds : 1))
}

run_suite() {  # run_suite NAME PERCENT: the suite with PERCENT of the time left as its budget, hard-stopped at the part's end
    local name=$1 percent=$2 cases_variable=CASES_$1
    local budget=$(($(left) * percent / 100))
    suites+=("$name")
    if [ "$budget" -lt 20 ]; then
        echo "[$name] not run: $(left) s left" | tee -a "$logs/$name.log"
        return
    fi
    timeout --signal=TERM --kill-after=15 "$(left)" python3 -m benchmarks.run "$name" --budget-s "$budget" \
        ${!cases_variable:+--cases "${!cases_variable}"} 2>&1 | tee "$logs/$name.log"
}

gpu_tests() {
    timeout --signal=TERM --kill-after=15 "$(left)" python3 -m pytest tests/gpu -q -rA -p no:cacheprovider \
        --junitxml="$logs/gpu_tests.xml" 2>&1 | tee "$logs/gpu_tests.log"
    python3 -m benchmarks.run record-tests "$logs/gpu_tests.xml" | tee "$logs/gpu_tests_summary.txt"
}

case $part in
    kernels)
        export MAMBA_SSM_CSRC=${MAMBA_SSM_CSRC:-$(ls -d "$PWD"/.mamba_ssm_src/mamba_ssm-*/csrc/selective_scan 2>/dev/null | head -n 1)}
        export MAX_JOBS=${MAX_JOBS:-16}
        python3 -m benchmarks.mamba_ssm_cuda >"$logs/mamba_ssm_build.log" 2>&1 &
        build=$!
        [ "${GPU_TESTS:-1}" = 0 ] || gpu_tests
        wait "$build"
        tail -n 3 "$logs/mamba_ssm_build.log"
        run_suite kernels 100
        ;;
    generate) run_suite generate 100 ;;
    long)
        run_suite prefill 30
        run_suite train 80
        run_suite memory 100
        ;;
    prefill) run_suite prefill 100 ;;
    lora) run_suite lora 100 ;;
    tests) gpu_tests ;;
    *) echo "unknown part $part: kernels, generate, long, prefill, lora or tests" >&2; exit 2 ;;
esac

# Only this part's results files, so that extracting one part's archive leaves the other parts' files as they are.
names=(${suites[@]+"${suites[@]}"})
[ -f "$logs/gpu_tests.xml" ] && names+=(gpu_tests)
written=()
for name in ${names[@]+"${names[@]}"}; do
    for file in benchmarks/results/"$name".{json,md,png}; do
        [ -f "$file" ] && written+=("$file")
    done
done
[ ${#written[@]} -gt 0 ] && tar -czf "$out/$part-results.tar.gz" "${written[@]}"
tar -czf "$out/$part-logs.tar.gz" -C "$logs" .
{
    echo "== part $part: $(($(date +%s) - start)) s, commit $SAMBA_COMMIT"
    [ -f "$logs/gpu_tests_summary.txt" ] && echo "gpu tests: $(cat "$logs/gpu_tests_summary.txt")"
    [ ${#suites[@]} -gt 0 ] && python3 -m benchmarks.run summary "${suites[@]}"
} | tee "$out/$part-summary.txt"
