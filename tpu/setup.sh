#!/usr/bin/env bash
# Copies this checkout to every worker and installs gemjax with TPU JAX.
set -euo pipefail
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$ROOT" --exclude .venv --exclude runs --exclude .git -czf /tmp/gemjax.tgz .
"${GCLOUD_TPU[@]}" scp /tmp/gemjax.tgz "$TPU_NAME":/tmp/gemjax.tgz --worker=all
"${GCLOUD_TPU[@]}" ssh "$TPU_NAME" --worker=all --command \
  'mkdir -p ~/gemjax && tar -xzf /tmp/gemjax.tgz -C ~/gemjax && cd ~/gemjax && python3 -m venv .venv && .venv/bin/pip install -q -e ".[tpu]"'
