# shellcheck shell=bash disable=SC2034  # the settings are used by the scripts that source this
# Shared settings and helpers for the tpu/ scripts; sourced, never run.
# Override any setting by exporting it before calling a script.
#
#   TPU_NAME     queued resource and TPU VM name (with NUM_SLICES>1 the
#                slices are the nodes TPU_NAME-0 .. TPU_NAME-<N-1>)
#   ZONE         e.g. us-east5-a
#   PROJECT      default: gcloud's configured project
#   ACCELERATOR  one slice, e.g. v5p-128 (default v5p-8)
#   RUNTIME      TPU VM software version (default v2-alpha-tpuv5)
#   NUM_SLICES   slices of ACCELERATOR (default 1; >1 is multislice)
#   CAPACITY     on-demand | spot | reserved (default on-demand)
#   QUEUED       1: create through a queued resource (default); 0: tpu-vm create
#   DRY_RUN      1 (or --dry-run as the first argument): print each gcloud
#                call instead of running it
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${ACCELERATOR:=v5p-8}"
: "${RUNTIME:=v2-alpha-tpuv5}"
: "${NUM_SLICES:=1}"
: "${CAPACITY:=on-demand}"
: "${QUEUED:=1}"
: "${DRY_RUN:=0}"

die() { echo "error: $*" >&2; exit 1; }

# gc ARGS...: runs `gcloud ARGS...`, or prints it (shell-quoted) when DRY_RUN=1.
gc() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud'; printf ' %q' "$@"; printf '\n'
  else
    gcloud "$@"
  fi
}

if [[ -z "${PROJECT:-}" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    PROJECT='<gcloud-config-project>'
  else
    PROJECT="$(gcloud config get-value project 2>/dev/null)" || true
    [[ -n "$PROJECT" ]] || die "set PROJECT (gcloud has no default project)"
  fi
fi

[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES=$NUM_SLICES: expected a positive integer"
if (( NUM_SLICES > 1 )) && [[ "$QUEUED" != 1 ]]; then
  die "NUM_SLICES=$NUM_SLICES needs QUEUED=1 (multislice is created through a queued resource)"
fi

# The TPU VM nodes: one per slice, named as the queued resource names them.
NODES=()
if (( NUM_SLICES > 1 )); then
  for ((i = 0; i < NUM_SLICES; i++)); do NODES+=("$TPU_NAME-$i"); done
else
  NODES=("$TPU_NAME")
fi

WHERE=(--project "$PROJECT" --zone "$ZONE")
TPU_VM=(compute tpus tpu-vm)
QR=(compute tpus queued-resources)
