#!/usr/bin/env bash
# Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d/):
# one database per server, each owned by a user of the same name, as infra/compose.yaml's
# MLFLOW_BACKEND_STORE_URI and PREFECT_API_DATABASE_CONNECTION_URL expect. Changing a password
# in infra/.env later needs `ALTER USER ... PASSWORD ...` (or a fresh `postgres` volume).
set -euo pipefail

create_database() {  # name (also the owning user's name), password
  psql --variable ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    --set name="$1" --set password="$2" <<'SQL'
CREATE USER :"name" WITH PASSWORD :'password';
CREATE DATABASE :"name" OWNER :"name";
SQL
}

create_database mlflow "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
create_database prefect "${PREFECT_DB_PASSWORD:?set PREFECT_DB_PASSWORD}"
