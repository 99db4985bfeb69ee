#!/usr/bin/env bash
# Entrypoint of the cluster-manager image (`ow deploy`): OPENWEIGHTS_URL and OPENWEIGHTS_API_KEY
# come from the pod env; RUNPOD_API_KEY and limits from the org's secrets; OW_CLUSTER_ARGS holds
# extra `ow cluster` flags.
set -euo pipefail
# shellcheck disable=SC2086
exec ow cluster --provider runpod ${OW_CLUSTER_ARGS:-}
