#!/usr/bin/env bash
set -euo pipefail
source "$(dirname "$0")/env.sh"
"${GCLOUD_TPU[@]}" delete "$TPU_NAME" --quiet
