#!/usr/bin/env bash
# Starts a command in ~/gemjax on every worker of every slice, in the
# background (nohup), so it keeps running when ssh drops. Leading VAR=value
# words become exports on the workers:
#
#   tpu/run.sh LIBTPU_INIT_ARGS=--xla_foo=1 python train.py configs/flash.yaml mesh.distributed=true
#
# Each worker writes ~/gemjax/logs/<timestamp>-<hostname>.log (the hostname
# keeps the workers' logs apart once tpu/logs.sh copies them back).
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"

EXPORTS=""
while [[ $# -gt 0 && "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do
  EXPORTS+="export ${1%%=*}=$(printf '%q' "${1#*=}"); "
  shift
done
[[ $# -gt 0 ]] || die "usage: tpu/run.sh [--dry-run] [VAR=value ...] COMMAND [ARGS ...]"

STAMP="$(date -u +%Y%m%d-%H%M%S)"
# ssh starts in the home directory. Only nohup's command is backgrounded and
# all three of its streams are redirected, so ssh returns at once. $(hostname)
# is left for the worker's shell to expand.
# shellcheck disable=SC2016
CMD='cd gemjax || exit 1; mkdir -p logs; . .venv/bin/activate; '"$EXPORTS"
# shellcheck disable=SC2016
CMD+="LOG=logs/$STAMP-"'$(hostname).log; '
# shellcheck disable=SC2016
CMD+="nohup $(printf '%q ' "$@")"'> "$LOG" 2>&1 < /dev/null & '
# shellcheck disable=SC2016
CMD+='echo "$(hostname): started, log ~/gemjax/$LOG"'

for node in "${NODES[@]}"; do
  gc "${TPU_VM[@]}" ssh "$node" "${WHERE[@]}" --worker=all --command "$CMD"
done
echo "logs: ~/gemjax/logs/$STAMP-<hostname>.log on each worker; copy them here with tpu/logs.sh"
