#!/usr/bin/env bash
# The shared MLflow tracking server: runs and the model registry in PostgreSQL,
# artifacts in S3, served through the server (--artifacts-destination), so
# clients need only MLFLOW_TRACKING_URI, never S3 credentials.
#
# Settings come from the environment (see mlflow/server.env.example):
#   MLFLOW_BACKEND_STORE_URI      required  postgresql://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  required  s3://BUCKET/PREFIX
#   MLFLOW_S3_ENDPOINT_URL        optional  an S3-compatible endpoint (MinIO, ...); unset for AWS
#   MLFLOW_HOST                   optional  interface to bind (default 127.0.0.1; 0.0.0.0 in a container)
#   MLFLOW_PORT                   optional  default 5000
#   MLFLOW_WORKERS                optional  server worker processes, default 2
#   MLFLOW_ALLOWED_HOSTS          optional  Host headers to accept, comma-separated, `*` patterns allowed; replaces
#                                           the default (localhost and private IPs), so list those too if needed
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role): the server's S3 access
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:PASSWORD@localhost:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlops/mlflow-artifacts}"

args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --serve-artifacts
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --host "${MLFLOW_HOST:-127.0.0.1}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-2}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
# An empty database gets its tables on first start; a database from an older
# MLflow needs `mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"` once (back it up first).
exec mlflow server "${args[@]}"
