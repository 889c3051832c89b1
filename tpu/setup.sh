#!/usr/bin/env bash
# Copies this checkout (the files git tracks or would track) to every worker
# of every slice and installs gemjax[tpu] into ~/gemjax/.venv there.
#
# TPU VM images ship Python 3.10 and gemjax needs >= 3.11: the workers get
# uv (https://docs.astral.sh/uv/, into ~/.local/bin), which downloads a
# standalone CPython 3.11 without touching the system Python. The venv gets
# the tested versions from requirements.lock, then gemjax itself with its
# [tpu] extra (libtpu, gcsfs), which the CPU-only lock does not pin.
set -euo pipefail
if [[ "${1:-}" == --dry-run ]]; then export DRY_RUN=1; shift; fi
# shellcheck source=env.sh
source "$(dirname "$0")/env.sh"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

REMOTE="$(cat <<'SCRIPT'
set -euo pipefail
mkdir -p ~/gemjax
tar -xzf /tmp/gemjax.tgz -C ~/gemjax
cd ~/gemjax
if ! command -v uv >/dev/null && [ ! -x ~/.local/bin/uv ]; then
  curl -LsSf https://astral.sh/uv/install.sh | sh
fi
export PATH="$HOME/.local/bin:$PATH"
uv venv --python 3.11 --seed --allow-existing .venv
if [ -f requirements.lock ]; then
  uv pip install --python .venv/bin/python -r requirements.lock
fi
uv pip install --python .venv/bin/python -e '.[tpu]'
.venv/bin/python -c 'import gemjax, jax; print("gemjax ready on", jax.__version__)'
SCRIPT
)"

if [[ "$DRY_RUN" == 1 ]]; then
  TARBALL='<tmpdir>/gemjax.tgz'
  echo "+ tar -czf $TARBALL <the files of $ROOT that git tracks or would track>"
else
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  TARBALL="$TMP/gemjax.tgz"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard \
      | (cd "$ROOT" && tar --null -T - -czf "$TARBALL")
  else
    tar -C "$ROOT" --exclude .venv --exclude runs --exclude .git -czf "$TARBALL" .
  fi
fi
for node in "${NODES[@]}"; do
  gc "${TPU_VM[@]}" scp "$TARBALL" "$node:/tmp/gemjax.tgz" "${WHERE[@]}" --worker=all
  gc "${TPU_VM[@]}" ssh "$node" "${WHERE[@]}" --worker=all --command "$REMOTE"
done
