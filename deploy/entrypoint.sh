#!/usr/bin/env bash
# facetron container entry point.
#   serve            tritonserver with the flags `facetron serve` uses (the default)
#   train USER       prepare /photos/USER and train its LoRA into the users volume
#   anything else    run as given (e.g. `facetron generate ...`)
#
# serve reads: FACETRON_TARGET (cpu|gpu, set by the image), FACETRON_IDENTITY_MODE
# (runtime_lora|merged; merged = explicit model control: the base models load
# at start by name, users' merged unet_user_* on first use, at most
# max_merged_models at once), MODEL_REPOSITORY (default /models), and the
# admin key of Triton's non-inference APIs (shared-memory, model-repository,
# model-config, statistics, trace, logging; restricted in every mode):
# FACETRON_ADMIN_KEY, else the file FACETRON_ADMIN_KEY_FILE (default
# /tmp/facetron/admin-key; a random key is written there when it is missing).
# Callers send it as gRPC metadata `triton-grpc-protocol-facetron-admin-key`
# or HTTP header `facetron-admin-key` (facetron.triton.server.ADMIN_HEADER;
# the flags are built there, by `facetron serve`, never here).
#
# Both targets start through `facetron serve`: the cpu image supervises the
# wheel's tritonserver; the gpu image's `--exec` becomes NGC's tritonserver
# with the same flags. FACETRON_PRINT_COMMAND=1 prints the command instead.
set -euo pipefail

MODEL_REPOSITORY="${MODEL_REPOSITORY:-/models}"
IDENTITY_MODE="${FACETRON_IDENTITY_MODE:-runtime_lora}"
ADMIN_KEY_FILE="${FACETRON_ADMIN_KEY_FILE:-/tmp/facetron/admin-key}"

serve_args() {
  local control=none
  [[ "$IDENTITY_MODE" == merged ]] && control=explicit
  # bound to all interfaces (the pod's network and its NetworkPolicy are the boundary), fixed ports
  echo --repo "$MODEL_REPOSITORY" --host 0.0.0.0 --grpc-port 8001 --http-port 8000 --metrics-port 8002 \
       --model-control "$control" --admin-key-file "$ADMIN_KEY_FILE" --startup-timeout 600 --log /dev/stdout
  [[ "$control" == explicit ]] && echo --load-base-models
  [[ "${FACETRON_TARGET:-gpu}" == gpu ]] && \
    echo --exec /opt/tritonserver/bin/tritonserver --backend-directory /opt/tritonserver/backends
  [[ -n "${FACETRON_PRINT_COMMAND:-}" ]] && echo --print-command
  return 0
}

case "${1:-serve}" in
  serve)
    shift || true
    case "$IDENTITY_MODE" in runtime_lora|merged) ;; *)
      echo "entrypoint: FACETRON_IDENTITY_MODE must be runtime_lora or merged, got '$IDENTITY_MODE'" >&2; exit 2;;
    esac
    # shellcheck disable=SC2046  # serve_args' words hold no spaces
    FACETRON_ALLOW_PUBLIC_BIND=1 exec facetron serve $(serve_args) "$@"
    ;;
  train)
    user="${2:?usage: train USER_ID  (photos in /photos/USER_ID)}"
    facetron train prepare "/photos/$user" --user "$user" --out "/work/$user/prepared" \
      --users-dir "${FACETRON_USERS_DIR:-/users}" ${FACETRON_BASE_MODEL:+--base-model "$FACETRON_BASE_MODEL"} --no-progress
    exec facetron train lora "/work/$user/prepared/dataset" --user "$user" --out "/work/$user/lora" \
      --reference-embedding "/work/$user/prepared/reference_embedding.npy" \
      --users-dir "${FACETRON_USERS_DIR:-/users}" ${FACETRON_BASE_MODEL:+--base-model "$FACETRON_BASE_MODEL"} --no-progress
    ;;
  *)
    exec "$@"
    ;;
esac
