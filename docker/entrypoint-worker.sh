#!/usr/bin/env bash
# Entrypoint of every openweights worker image (and the contract for custom ones):
#   OPENWEIGHTS_URL      the server (set by the cluster manager)
#   OPENWEIGHTS_API_KEY  the pod's own worker token (never a user key)
#   OW_WORKER_NAME       the pod name: the manager matches the worker to its pod by it
#   OW_DOCKER_IMAGE      the image name: the worker takes only jobs of this image (or of none)
#   OW_PROVIDER          runpod | local | …
#   PUBLIC_KEY           optional: authorized key for `ow ssh`; starts sshd
#   OW_DEV=true          optional: keep the pod up without a worker (for `ow ssh`)
set -euo pipefail

if [ -n "${PUBLIC_KEY:-}" ]; then
  mkdir -p ~/.ssh && chmod 700 ~/.ssh
  echo "$PUBLIC_KEY" >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
  ssh-keygen -A >/dev/null 2>&1 || true
  /usr/sbin/sshd || echo "warning: sshd did not start" >&2
fi

if [ "${OW_DEV:-}" = "true" ]; then
  echo "OW_DEV=true: no worker; the pod stays up for ssh"
  exec sleep infinity
fi

args=(--provider "${OW_PROVIDER:-runpod}")
[ -n "${OW_WORKER_NAME:-}" ] && args+=(--name "$OW_WORKER_NAME")
[ -n "${OW_DOCKER_IMAGE:-}" ] && args+=(--docker-image "$OW_DOCKER_IMAGE")
# `python -m openweights.worker` (what `ow worker` runs) also takes --provider.
# exec: the worker is PID 1's child under tini and gets SIGTERM directly, so it can give its job
# back (requeued at once) when the pod is stopped.
exec python -m openweights.worker "${args[@]}"
