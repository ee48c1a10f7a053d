#!/usr/bin/env bash
# Accelerator check (issue 14 item 4): logits parity vs transformers, rollout static vs compact with
# decode's memory-bandwidth roofline fraction, and the update's MFU. Writes JSON to $OUT when set,
# else bench/out/device_check/. Runs on one GPU in under 8 minutes; on CPU use --quick.
#
#   bench/device_check.sh                      # full (meant for one GPU; H200 peaks by default)
#   bench/device_check.sh --quick              # small shapes, a few minutes on a CPU
#   bench/device_check.sh --peak-bw 3.35e12 --peak-flops 989e12   # another card (H100 SXM)
#
# Extra arguments go to every part (python -m bench.device_check --help). A failing part is
# reported and the others still run; the exit status is non-zero if any failed.
set -u
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-bench/out/device_check}"
mkdir -p "$OUT_DIR"
status=0
for part in parity rollout update; do
  echo "=== device_check: $part ==="
  start=$(date +%s)
  if ! "$PY" -m bench.device_check "$part" --out-dir "$OUT_DIR" "$@"; then
    echo "=== device_check: $part FAILED ==="
    status=1
  fi
  echo "=== device_check: $part took $(( $(date +%s) - start )) s ==="
done
exit $status
