#!/usr/bin/env bash
# Make Docker ready for the Compose tests and build the zk0 image (idempotent; re-runs are quick).
#   1. a Docker engine: use the running one, else (as root) apt-get install docker.io and start dockerd;
#   2. Compose v2: the `docker compose` plugin, else Debian trixie's package, unpacked (REFERENCE.md);
#   3. a Python 3.12 base image: BASE_IMAGE when set, else zk0-base:py3.12-bookworm from
#      docker/make-base-image.sh (no registry is needed);
#   4. the image: `docker compose build` of docker/Dockerfile, tagged $ZK0_IMAGE (zk0:latest).
# The build trusts extra CA certificates from docker/certs/*.crt; ZK0_BUILD_CA_FILE (default: this
# host's CA bundle) is copied there first, so builds work behind an HTTPS-intercepting proxy.
# Prints the timings and the image size. Exits non-zero when Docker cannot be made ready.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "docker-setup: $*" >&2; }
t0=$SECONDS

if ! docker info >/dev/null 2>&1; then
    [[ $EUID -eq 0 ]] || { say "no Docker engine reachable and not root: start dockerd or run as root"; exit 1; }
    if ! command -v dockerd >/dev/null; then
        say "installing docker.io and debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q docker.io debootstrap >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q docker.io debootstrap >/dev/null; }
    fi
    say "starting dockerd (log: /tmp/zk0-dockerd.log)"
    nohup dockerd >/tmp/zk0-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { tail -20 /tmp/zk0-dockerd.log >&2; say "dockerd did not start"; exit 1; }
fi

if ! docker compose version >/dev/null 2>&1; then
    say "installing the Compose v2 plugin from Debian trixie's docker-compose package"
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/lists/partial" "$tmp/dl"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${DEBIAN_MIRROR:-http://deb.debian.org/debian} trixie main" >"$tmp/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$tmp/sources.list" -o "Dir::Etc::sourceparts=-" -o "Dir::State::Lists=$tmp/lists")
    apt-get update -q "${apt_opts[@]}" >/dev/null
    (cd "$tmp/dl" && apt-get download -q "${apt_opts[@]}" docker-compose >/dev/null 2>&1)
    dpkg -x "$tmp"/dl/docker-compose_*.deb "$tmp/x"
    mkdir -p "$HOME/.docker/cli-plugins"
    cp "$tmp/x/usr/libexec/docker/cli-plugins/docker-compose" "$HOME/.docker/cli-plugins/"
    rm -rf "$tmp"
fi
say "$(docker compose version)"

if [[ -z "${BASE_IMAGE:-}" ]]; then
    export BASE_IMAGE=zk0-base:py3.12-bookworm
    if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
        t=$SECONDS
        docker/make-base-image.sh "$BASE_IMAGE"
        say "base image $BASE_IMAGE built in $((SECONDS - t)) s"
    fi
fi

ca="${ZK0_BUILD_CA_FILE:-/etc/ssl/certs/ca-certificates.crt}"
[[ -f "$ca" ]] && cp "$ca" docker/certs/build-host.crt
export ZK0_IMAGE="${ZK0_IMAGE:-zk0:latest}"
t=$SECONDS
# The legacy builder: this engine's BuildKit needs the buildx plugin, which Debian bookworm lacks.
DOCKER_BUILDKIT=0 docker build -q -f docker/Dockerfile --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$ZK0_IMAGE" . >/dev/null
say "image $ZK0_IMAGE built in $((SECONDS - t)) s; size $(docker image inspect -f '{{.Size}}' "$ZK0_IMAGE" | awk '{printf "%.2f GB", $1/1e9}')"
docker image prune -f >/dev/null  # dangling layers of earlier builds
say "ready in $((SECONDS - t0)) s"
