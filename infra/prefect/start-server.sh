#!/usr/bin/env bash
# A Prefect server whose database is PostgreSQL instead of the default SQLite.
#
# Settings from the environment (see infra/prefect/prefect.env.example):
#   PREFECT_API_DATABASE_CONNECTION_URL  required  postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect
#   PREFECT_SERVER_API_HOST              optional  interface to bind (default 127.0.0.1; 0.0.0.0 in a container)
#   PREFECT_SERVER_API_PORT              optional  default 4200
# Clients and workers then use PREFECT_API_URL=http://HOST:PORT/api.
set -euo pipefail

: "${PREFECT_API_DATABASE_CONNECTION_URL:?set PREFECT_API_DATABASE_CONNECTION_URL, e.g. postgresql+asyncpg://prefect:PASSWORD@localhost:5432/prefect}"
case "$PREFECT_API_DATABASE_CONNECTION_URL" in
  postgresql+asyncpg://*) ;;
  *) echo "PREFECT_API_DATABASE_CONNECTION_URL must start with postgresql+asyncpg:// (the driver Prefect uses)" >&2; exit 2 ;;
esac
export PREFECT_SERVER_API_HOST="${PREFECT_SERVER_API_HOST:-127.0.0.1}"
export PREFECT_SERVER_API_PORT="${PREFECT_SERVER_API_PORT:-4200}"

# Create or migrate the schema before serving (idempotent).
prefect server database upgrade --yes
exec prefect server start --host "$PREFECT_SERVER_API_HOST" --port "$PREFECT_SERVER_API_PORT"
