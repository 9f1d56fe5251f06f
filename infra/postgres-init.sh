#!/bin/sh
# Runs once, on an empty data directory: one database and one owner per server.
set -eu
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" <<SQL
CREATE USER prefect WITH PASSWORD '${PREFECT_DB_PASSWORD}';
CREATE DATABASE prefect OWNER prefect;
CREATE USER mlflow WITH PASSWORD '${MLFLOW_DB_PASSWORD}';
CREATE DATABASE mlflow OWNER mlflow;
SQL
# Prefect's search needs pg_trgm (PostgreSQL >= 14.9).
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d prefect -c "CREATE EXTENSION IF NOT EXISTS pg_trgm;"
