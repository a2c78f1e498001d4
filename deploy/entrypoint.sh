#!/usr/bin/env bash
# facetron container entry point.
#   serve            tritonserver with the flags `facetron serve` uses (the default)
#   train USER       prepare /photos/USER and train its LoRA into the users volume
#   anything else    run as given (e.g. `facetron generate ...`)
#
# serve reads: FACETRON_TARGET (cpu|gpu, set by the image), FACETRON_IDENTITY_MODE
# (runtime_lora|merged; merged = explicit model control, every model loaded at
# start and users' merged UNets loaded on first use), FACETRON_ADMIN_KEY (the
# header value for the restricted repository / shared-memory APIs; random when
# unset), MODEL_REPOSITORY (default /models).
set -euo pipefail

MODEL_REPOSITORY="${MODEL_REPOSITORY:-/models}"
IDENTITY_MODE="${FACETRON_IDENTITY_MODE:-runtime_lora}"
ADMIN_KEY="${FACETRON_ADMIN_KEY:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')}"

serve_flags() {
  local control=none
  [[ "$IDENTITY_MODE" == merged ]] && control=explicit
  # the same flags as facetron.triton.server.TritonServer.command, bound to all
  # interfaces (the pod's network is the boundary) on the fixed ports
  echo --model-repository="$MODEL_REPOSITORY" \
       --grpc-address=0.0.0.0 --grpc-port=8001 \
       --http-address=0.0.0.0 --http-port=8000 \
       --metrics-address=0.0.0.0 --metrics-port=8002 --allow-metrics=true \
       --model-control-mode="$control" \
       --exit-on-error=true --strict-readiness=true --exit-timeout-secs=30 --log-verbose=0 \
       --backend-config=python,shm-region-prefix-name=facetron-pod- \
       "--grpc-restricted-protocol=model-repository,shared-memory:triton-grpc-protocol-admin-key=$ADMIN_KEY" \
       "--http-restricted-api=model-repository,shared-memory:admin-key=$ADMIN_KEY"
  [[ "$control" == explicit ]] && echo "--load-model=*"
  return 0
}

case "${1:-serve}" in
  serve)
    shift || true
    case "$IDENTITY_MODE" in runtime_lora|merged) ;; *)
      echo "entrypoint: FACETRON_IDENTITY_MODE must be runtime_lora or merged, got '$IDENTITY_MODE'" >&2; exit 2;;
    esac
    if [[ "${FACETRON_TARGET:-gpu}" == cpu ]]; then
      # nvidia-pytriton's tritonserver + python backend: `facetron serve` itself
      # (same flags; its admin key for the restricted APIs is its own random one)
      control=none; load=()
      [[ "$IDENTITY_MODE" == merged ]] && { control=explicit; load=(--load-model '*'); }
      FACETRON_ALLOW_PUBLIC_BIND=1 exec facetron serve --repo "$MODEL_REPOSITORY" --host 0.0.0.0 \
        --grpc-port 8001 --http-port 8000 --metrics-port 8002 --model-control "$control" "${load[@]}" \
        --log /dev/stdout --startup-timeout 600 "$@"
    fi
    exec tritonserver $(serve_flags) "$@"
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
