# Shared settings for the tpu/ scripts; override by exporting before calling.
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
: "${ACCELERATOR:=v5p-8}"
: "${RUNTIME:=v2-alpha-tpuv5}"
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
GCLOUD_TPU=(gcloud compute tpus tpu-vm --project "$PROJECT" --zone "$ZONE")
