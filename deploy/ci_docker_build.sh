#!/usr/bin/env bash
# CI step: build the Tandem image from deploy/Dockerfile and smoke-test its entrypoint.
# Skips (exit 0, with the reason) when docker or its daemon is not available, as on machines
# without a container runtime; fails when the build or the smoke test fails.
#   bash deploy/ci_docker_build.sh [TAG]
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-tandem:ci}"

if ! command -v docker >/dev/null 2>&1; then
  echo "docker build: SKIPPED (no docker client on PATH)"
  exit 0
fi
if ! timeout 30 docker info >/dev/null 2>&1; then
  echo "docker build: SKIPPED (the docker daemon is not reachable: $(docker info 2>&1 | tail -n 1))"
  exit 0
fi

echo "docker build: building ${tag} from deploy/Dockerfile"
docker build -f deploy/Dockerfile -t "${tag}" .
# The entrypoint is `tandem run`: resolving the shipped default config exercises the install
# without running a job.
docker run --rm "${tag}" --print-config >/dev/null
docker run --rm --entrypoint cat "${tag}" /opt/tandem/VERSIONS
# The job's user is not root.
uid="$(docker run --rm --entrypoint id "${tag}" -u)"
if [ "${uid}" = 0 ]; then
  echo "docker build: FAILED (the image runs as root)" >&2
  exit 1
fi

# A model baked in by `tandem image build --model` (deploy/model.Dockerfile): in place, readable
# by the job's user although its file is mode 0600, and declared by the image's label.
if command -v tandem >/dev/null 2>&1; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "${tmp}"' EXIT
  mkdir "${tmp}/tiny-model"
  echo '{}' > "${tmp}/tiny-model/config.json"
  chmod 600 "${tmp}/tiny-model/config.json"
  tandem image build --tag "${tag}-model" --model "${tmp}/tiny-model" \
    --manifest "${tmp}/models.json"
  docker run --rm --entrypoint cat "${tag}-model" /opt/tandem/models/tiny-model/config.json \
    >/dev/null
  docker inspect --format '{{ index .Config.Labels "dev.tandem.model.tiny-model" }}' \
    "${tag}-model" | grep -qx /opt/tandem/models/tiny-model
else
  echo "docker build: model layer SKIPPED (no tandem on PATH)"
fi
echo "docker build: OK (${tag})"
