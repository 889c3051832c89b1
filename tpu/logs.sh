#!/usr/bin/env bash
# Copies ~/gemjax/logs from every worker of every slice into DEST (default
# tpu-logs/$TPU_NAME), one folder per slice: DEST/<node>/logs/*.log.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
DEST="${1:-tpu-logs/$TPU_NAME}"
for node in "${NODES[@]}"; do
  [[ "$DRY_RUN" == 1 ]] || mkdir -p "$DEST/$node"
  # A remote path without ~ is relative to the home directory.
  gc "${TPU_VM[@]}" scp "$node:gemjax/logs" "$DEST/$node" "${WHERE[@]}" --worker=all --recurse
done
