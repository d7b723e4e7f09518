#!/bin/sh
# Runs once, when the postgres container starts on an empty data directory
# (/docker-entrypoint-initdb.d). Two roles and two databases: fhirgate's store and HAPI's, so
# neither can read or change the other's tables. The passwords come from deploy/.env and are
# passed as psql variables (quoted by psql, never spliced into the SQL text).
set -eu

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v fhirgate_password="$DB_PASSWORD" -v hapi_password="$HAPI_DB_PASSWORD" <<'SQL'
CREATE ROLE fhirgate LOGIN PASSWORD :'fhirgate_password';
-- The owner creates fhirgate's tables (migrations run at every instance's start).
CREATE DATABASE fhirgate OWNER fhirgate;
CREATE ROLE hapi LOGIN PASSWORD :'hapi_password';
CREATE DATABASE hapi OWNER hapi;
SQL
