#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/env.sh"
if [[ "${QUEUED:-0}" == 1 ]]; then
  gcloud compute tpus queued-resources create "$TPU_NAME" --project "$PROJECT" --zone "$ZONE" \
    --node-id "$TPU_NAME" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME"
else
  "${GCLOUD_TPU[@]}" create "$TPU_NAME" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
