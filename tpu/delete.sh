#!/usr/bin/env bash
# Deletes the TPU VM node(s), then the queued resource that held them.
# A node that is already gone is reported and skipped, so a half-deleted
# slice can be cleaned up by running this again.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
for node in "${NODES[@]}"; do
  gc "${TPU_VM[@]}" delete "$node" "${WHERE[@]}" --quiet || echo "note: could not delete node $node (already gone?)" >&2
done
if [[ "$QUEUED" == 1 ]]; then
  # --force deletes the queued resource whatever its state (and any node left).
  gc "${QR[@]}" delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
fi
