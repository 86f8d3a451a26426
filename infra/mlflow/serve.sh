#!/usr/bin/env bash
# MLflow tracking server for a cluster: PostgreSQL backend store + object-store (or file) artifacts.
#
#   infra/mlflow/serve.sh                                   # 127.0.0.1:5000, see README.md here
#   MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/hescape-mlflow infra/mlflow/serve.sh
#
# Environment (all optional):
#   MLFLOW_BACKEND_STORE_URI      default postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow
#                                 Put no password in it (it would show in `ps` and logs): libpq
#                                 reads it from ~/.pgpass or $PGPASSFILE.
#   MLFLOW_ARTIFACTS_DESTINATION  s3://bucket/prefix | gs://... | file:///abs/dir
#                                 (default file://$PWD/runs/mlflow-artifacts). S3 credentials come
#                                 from the instance role or ~/.aws/credentials, never this script.
#   HESCAPE_BIND_HOST             default 127.0.0.1. Opt in to other hosts with e.g. 0.0.0.0.
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (4), MLFLOW_ALLOWED_HOSTS (host-header allow-list)
#   HESCAPE_DRY_RUN=1             print the command instead of running it
#
# SECURITY. The MLflow server has no authentication by default: anyone who can reach the port can
# read every run, parameter and artifact, and create, change or delete runs, experiments and
# models (and upload artifacts). It binds 127.0.0.1: users reach it with an SSH tunnel
# (ssh -L 5000:127.0.0.1:5000 <server>), cluster nodes through a tunnel or a private address you
# opt in to. Binding another address (HESCAPE_BIND_HOST) exposes all of that to the network:
# only on a private network, behind an authenticating reverse proxy with TLS, or with
# `--app-name basic-auth` (pass it via MLFLOW_EXTRA_ARGS). See docs/security.md.
set -euo pipefail

BACKEND=${MLFLOW_BACKEND_STORE_URI:-postgresql+psycopg2://mlflow@127.0.0.1:5432/mlflow}
ARTIFACTS=${MLFLOW_ARTIFACTS_DESTINATION:-file://$(pwd)/runs/mlflow-artifacts}
HOST=${HESCAPE_BIND_HOST:-127.0.0.1}
PORT=${MLFLOW_PORT:-5000}
WORKERS=${MLFLOW_WORKERS:-4}
MLFLOW=${MLFLOW:-mlflow}
# MLflow's job runner (huey consumers for GenAI judges/trace jobs) is not used by hescape and its
# consumers outlived the server after Ctrl-C; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it on.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

# SQLAlchemy 2.1 maps postgresql:// to psycopg 3; the project installs psycopg2.
if [[ "$BACKEND" == postgresql://* || "$BACKEND" == postgres://* ]]; then
  BACKEND="postgresql+psycopg2://${BACKEND#*://}"
fi
if [[ "$BACKEND" =~ ://[^/@:]+:[^/@]+@ ]]; then
  echo "warning: MLFLOW_BACKEND_STORE_URI contains a password; it is visible in the process" \
       "list. Put it in ~/.pgpass (host:port:db:user:password, mode 600) instead." >&2
fi
case "$HOST" in
  127.0.0.1|localhost|::1) ;;
  *) echo "warning: HESCAPE_BIND_HOST=$HOST exposes an MLflow server without authentication to" \
          "every host that can reach $HOST:$PORT (read, change and delete all runs)." >&2 ;;
esac
CMD=("$MLFLOW" server
  --backend-store-uri "$BACKEND"
  --artifacts-destination "$ARTIFACTS"
  --serve-artifacts
  --host "$HOST"
  --port "$PORT"
  --workers "$WORKERS")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  CMD+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
if [[ -n "${MLFLOW_EXTRA_ARGS:-}" ]]; then
  read -r -a EXTRA <<< "$MLFLOW_EXTRA_ARGS"
  CMD+=("${EXTRA[@]}")
fi

if [[ "${HESCAPE_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
if [[ "$ARTIFACTS" == file://* ]]; then
  mkdir -p "${ARTIFACTS#file://}"
fi
exec "${CMD[@]}"
