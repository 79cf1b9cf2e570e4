#!/usr/bin/env bash
# A process worker for the pipeline's deployments, run from the project root.
# Waits for the server, registers the `training` and `drift-check` deployments
# (flows/deployments.py; creates the work pool named in params.yaml,
# orchestration.work_pool), then polls that pool.
#
# Settings from the environment:
#   PREFECT_API_URL               required  http://HOST:4200/api
#   PREFECT_REGISTER_DEPLOYMENTS  optional  1 (default) registers the deployments first; 0 skips it
#   PREFECT_WORKER_WAIT_SECONDS   optional  how long to wait for the server, default 120
#   PIPELINE_DVC_REMOTE_URL       optional  s3://BUCKET/PREFIX: written as the DVC remote of this checkout (config.local)
#   MLFLOW_TRACKING_URI and the S3 settings of the pipeline reach the flow runs from this environment.
set -euo pipefail
cd "$(dirname "$0")/../.."

: "${PREFECT_API_URL:?set PREFECT_API_URL, e.g. http://localhost:4200/api}"

python - <<'PY'
import os, sys, time, urllib.request

url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
deadline = time.monotonic() + float(os.environ.get("PREFECT_WORKER_WAIT_SECONDS", "120"))
while True:
    try:
        with urllib.request.urlopen(url, timeout=5):
            break
    except OSError as error:
        if time.monotonic() > deadline:
            sys.exit(f"Prefect server at {url} did not answer: {error}")
        time.sleep(2)
PY

# DVC reads no PIPELINE_* variable: turn PIPELINE_DVC_REMOTE_URL into the checkout's (git-ignored)
# .dvc/config.local, so flow runs can `dvc push` / `dvc pull`.
if [[ -n "${PIPELINE_DVC_REMOTE_URL:-}" ]]; then
  python -m pipeline dvc-remote --local
fi

pool="$(python -c 'from pipeline.config import load_config; print(load_config().orchestration.work_pool)')"
if [[ "${PREFECT_REGISTER_DEPLOYMENTS:-1}" == 1 ]]; then
  python -m flows.deployments
fi
exec prefect worker start --pool "$pool" --type process
