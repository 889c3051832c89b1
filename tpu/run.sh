#!/usr/bin/env bash
# Runs the given command in ~/gemjax on all workers at once.
set -euo pipefail
source "$(dirname "$0")/env.sh"
CMD="cd ~/gemjax && .venv/bin/$(printf '%q ' "$@")"
"${GCLOUD_TPU[@]}" ssh "$TPU_NAME" --worker=all --command "$CMD"
