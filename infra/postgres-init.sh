#!/bin/sh
# Runs once, on an empty data directory: one database and one owner per server.
# The passwords are psql variables (`:'name'` quotes each as one SQL literal): the shell pastes no
# password into the SQL text (the heredoc is quoted), so a quote or `$` in one cannot change it.
set -eu
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" \
     -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER prefect WITH PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE USER mlflow WITH PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
SQL
# Prefect's search needs pg_trgm (PostgreSQL >= 14.9).
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d prefect -c "CREATE EXTENSION IF NOT EXISTS pg_trgm;"
