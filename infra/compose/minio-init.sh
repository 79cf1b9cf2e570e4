#!/bin/sh
# One-shot (the minio-init service): the bucket that every s3:// URI in infra/compose.yaml
# names. The MLflow artifacts, the DVC remote, the source images and the landing area are
# prefixes of it. Idempotent, so it runs on every `docker compose up`.
set -eu

: "${MINIO_ROOT_USER:?set MINIO_ROOT_USER}" "${MINIO_ROOT_PASSWORD:?set MINIO_ROOT_PASSWORD}"
mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD"
mc mb --ignore-existing local/mlops
