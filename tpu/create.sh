#!/usr/bin/env bash
# Creates the TPU slice(s) and waits until they are ready.
#
# Through a queued resource (QUEUED=1, the default; needed for multislice):
# requests it, then polls its state every POLL_S seconds (default 30) until
# ACTIVE, failing on FAILED/SUSPENDED or after WAIT_TIMEOUT_S (default 3600;
# the request then stays queued: rerun with WAIT_ONLY=1 to keep waiting).
# QUEUED=0 uses `tpu-vm create`, which fails at once if there is no capacity.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
: "${POLL_S:=30}"
: "${WAIT_TIMEOUT_S:=3600}"
: "${WAIT_ONLY:=0}"

# (${A[@]+"${A[@]}"} below: an empty array under set -u on macOS's bash 3.2.)
case "$CAPACITY" in
  on-demand) CAPACITY_FLAGS=() ;;
  spot) CAPACITY_FLAGS=(--spot) ;;
  reserved) CAPACITY_FLAGS=(--reserved) ;;
  *) die "CAPACITY=$CAPACITY: expected on-demand, spot or reserved" ;;
esac

if [[ "$QUEUED" != 1 ]]; then
  gc "${TPU_VM[@]}" create "$TPU_NAME" "${WHERE[@]}" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" ${CAPACITY_FLAGS[@]+"${CAPACITY_FLAGS[@]}"}
  exit 0
fi

if (( NUM_SLICES > 1 )); then
  NODE_FLAGS=(--node-count "$NUM_SLICES" --node-prefix "$TPU_NAME")
else
  NODE_FLAGS=(--node-id "$TPU_NAME")
fi
if [[ "$WAIT_ONLY" != 1 ]]; then
  gc "${QR[@]}" create "$TPU_NAME" "${WHERE[@]}" "${NODE_FLAGS[@]}" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" ${CAPACITY_FLAGS[@]+"${CAPACITY_FLAGS[@]}"}
fi

DESCRIBE=("${QR[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format='value(state.state)')
if [[ "$DRY_RUN" == 1 ]]; then
  gc "${DESCRIBE[@]}"
  echo "(then repeated every ${POLL_S}s until the state is ACTIVE)"
  exit 0
fi
deadline=$((SECONDS + WAIT_TIMEOUT_S))
while true; do
  state="$(gc "${DESCRIBE[@]}")"
  case "$state" in
    ACTIVE)
      echo "queued resource $TPU_NAME is ACTIVE: nodes ${NODES[*]}"
      exit 0 ;;
    FAILED | SUSPENDING | SUSPENDED)
      die "queued resource $TPU_NAME is $state; see why with: gcloud ${QR[*]} describe $TPU_NAME ${WHERE[*]}; remove it with tpu/delete.sh" ;;
  esac
  if (( SECONDS >= deadline )); then
    die "queued resource $TPU_NAME is still ${state:-in no state} after ${WAIT_TIMEOUT_S}s; it stays queued: wait more with WAIT_ONLY=1 tpu/create.sh, or tpu/delete.sh"
  fi
  echo "queued resource $TPU_NAME: ${state:-?}; next check in ${POLL_S}s"
  sleep "$POLL_S"
done
