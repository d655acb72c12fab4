#!/usr/bin/env bash
# Build the studio's image and smoke-test it on this machine's Docker engine (no GPU needed).
#
#   bash scripts/check_image.sh                  # base image from the registry (nvidia/cuda, Dockerfile's ARG)
#   bash scripts/check_image.sh --offline-base   # no registry: a local Debian 12 base (debootstrap + docker import)
#   options: --tag NAME (default step-audio-studio:latest, the tag compose uses), --no-build (test an existing
#            image), --keep (leave the test containers and volumes for inspection)
#
# Checks, each printed as "PASS ..." (the first failure stops the script with "FAIL ..." and exit status 1):
#   1. the image's default engine (step-audio) without models exits with status 78 and names the missing
#      files, and under compose's restart policy (on-failure:N) stops after N restarts instead of looping;
#   2. the preview engine answers /readyz, stores a voice and speaks with it, as uid 1000 (not root);
#      the HEALTHCHECK turns healthy although the app listens on a --port flag (STUDIO_PORT says another);
#      numba's kernels land in the cache volume; no .env, .git or key file is in /app;
#   3. a new container on the same cache volume still serves the voice;
#   4. `docker compose --profile tools run --rm download --check-only` runs the download script in the image
#      (compose's download service uses the image step-audio-studio:latest, whatever --tag says).
# Containers use the host's network (this works where the daemon runs without iptables/NAT, as here).
# --offline-base needs root and debootstrap; its base trusts this machine's CA bundle for pip (a TLS proxy
# in front of PyPI), which matters only for this local test image. Compose v2 (`docker compose`) is used
# when present, else v1 (`docker-compose`, which refuses the top-level `name:`: it gets a copy without it).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TAG="step-audio-studio:latest"
OFFLINE_BASE=0
BUILD=1
KEEP=0
BASE_TAG="studio-offline-base:bookworm"
while [ $# -gt 0 ]; do
    case "$1" in
        --offline-base) OFFLINE_BASE=1 ;;
        --tag) TAG="$2"; shift ;;
        --no-build) BUILD=0 ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "check_image.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

RUN_ID="studio-check-$$"
COMPOSE=()
WORK="$(mktemp -d)"
STARTED=$(date +%s)
say() { printf '[%4ss] %s\n' "$(( $(date +%s) - STARTED ))" "$*"; }
pass() { say "PASS $*"; }
fail() { say "FAIL $*"; exit 1; }
cleanup() {
    if [ "$KEEP" = 0 ]; then
        # -v: also the anonymous volumes of the image's VOLUMEs; the compose project is this run's own.
        docker ps -aq --filter "name=$RUN_ID" | xargs -r docker rm -f -v >/dev/null 2>&1 || true
        if [ ${#COMPOSE[@]} -gt 0 ]; then "${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true; fi
        docker volume ls -q --filter "name=$RUN_ID" | xargs -r docker volume rm >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v docker >/dev/null || fail "no docker command"
docker info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd)"
# A compose project of this run's own (-p), so its volumes and networks never touch a real deployment's.
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose -p "$RUN_ID" -f "$ROOT/docker-compose.yml")
    compose_version="v2 $(docker compose version --short)"
elif command -v docker-compose >/dev/null; then
    sed '/^name:/d' "$ROOT/docker-compose.yml" > "$WORK/docker-compose.yml"
    COMPOSE=(docker-compose -p "$RUN_ID" -f "$WORK/docker-compose.yml" --project-directory "$ROOT")
    compose_version="v1 $(docker-compose version --short)"
else
    fail "neither 'docker compose' nor 'docker-compose' is installed"
fi
say "load average at start: $(cut -d' ' -f1-3 /proc/loadavg); Docker engine $(docker version -f '{{.Server.Version}}'); compose $compose_version"

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
json_field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
wait_ready() {   # port, container, seconds
    local deadline=$(( $(date +%s) + $3 ))
    until curl -sf "http://127.0.0.1:$1/readyz" >/dev/null; do
        [ "$(docker inspect -f '{{.State.Running}}' "$2")" = true ] || { docker logs "$2" 2>&1 | tail -20; fail "$2 stopped before /readyz"; }
        [ "$(date +%s)" -lt "$deadline" ] || { docker logs "$2" 2>&1 | tail -20; fail "$2: no /readyz 200 within $3 s"; }
        sleep 1
    done
}

# ---------------------------------------------------------------------------------------------- build
BUILD_ARGS=()
if [ "$OFFLINE_BASE" = 1 ]; then
    if ! docker image inspect "$BASE_TAG" >/dev/null 2>&1; then
        command -v debootstrap >/dev/null || fail "--offline-base needs debootstrap (apt-get install debootstrap)"
        say "making the local base $BASE_TAG with debootstrap (Debian 12, minbase)"
        debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
            || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
        rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb
        changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
        if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
            # Not in /etc/ssl/certs: installing ca-certificates in the build would regenerate that bundle.
            cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/host-ca-bundle.pem"
            changes+=(--change 'ENV PIP_CERT=/etc/ssl/host-ca-bundle.pem')
        fi
        tar -C "$WORK/rootfs" -c . | docker import "${changes[@]}" - "$BASE_TAG" >/dev/null
        rm -rf "$WORK/rootfs"
    fi
    BUILD_ARGS+=(--build-arg "CUDA_IMAGE=$BASE_TAG")
fi
if [ "$BUILD" = 1 ]; then
    say "docker build -t $TAG ${BUILD_ARGS[*]} (log: $WORK/build.log while it runs)"
    build_started=$(date +%s)
    docker build --network host "${BUILD_ARGS[@]}" -t "$TAG" "$ROOT" > "$WORK/build.log" 2>&1 \
        || { tail -30 "$WORK/build.log"; fail "docker build"; }
    pass "built $TAG in $(( $(date +%s) - build_started )) s"
fi
size=$(docker image inspect -f '{{.Size}}' "$TAG")
say "image $TAG: $(( size / 1000000 )) MB"

# ---------------------------------------------------------------------------------------------- 1. no models
policy=$(sed -n 's/^  restart: *//p' "$ROOT/docker-compose.yml" | head -1)   # the studios' shared policy
case "$policy" in on-failure:[0-9]*) retries=${policy#on-failure:} ;; *) fail "compose restart policy is '$policy', not on-failure:N" ;; esac
docker run -d --name "$RUN_ID-nomodels" --network host --restart "$policy" -e STUDIO_PORT="$(free_port)" "$TAG" >/dev/null
deadline=$(( $(date +%s) + 600 ))
while :; do
    read -r status restarts code < <(docker inspect -f '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "$RUN_ID-nomodels")
    [ "$status" = exited ] && [ "$restarts" -ge "$retries" ] && break
    [ "$(date +%s)" -lt "$deadline" ] || fail "no models: still $status after $restarts restart(s)"
    sleep 2
done
sleep 5   # a looping policy would have started it again by now
read -r status restarts code < <(docker inspect -f '{{.State.Status}} {{.RestartCount}} {{.State.ExitCode}}' "$RUN_ID-nomodels")
message=$(docker logs "$RUN_ID-nomodels" 2>&1 | grep -m1 "cannot start" || true)
[ "$status" = exited ] && [ "$restarts" = "$retries" ] && [ "$code" = 78 ] && [ -n "$message" ] \
    || fail "no models: status=$status restarts=$restarts exit=$code message='$message'"
pass "no models: exit status 78, stopped after $restarts restarts ($policy): ${message:0:160}..."

# ---------------------------------------------------------------------------------------------- 2. preview engine
port=$(free_port)
docker volume create "$RUN_ID-cache" >/dev/null
# STUDIO_PORT names a port nobody listens on: the healthcheck must follow the --port flag.
docker run -d --name "$RUN_ID-a" --network host --health-interval 3s -e STUDIO_ENGINE=preview \
    -e STUDIO_PORT="$(free_port)" -v "$RUN_ID-cache:/app/cache" "$TAG" python app.py --port "$port" >/dev/null
wait_ready "$port" "$RUN_ID-a" 300
pass "preview engine: /readyz 200 on --port $port"
uid=$(docker exec "$RUN_ID-a" id -u)
[ "$uid" = 1000 ] || fail "the app runs as uid $uid"
pass "runs as uid $uid (non-root)"
t0=$(date +%s.%N)
voice=$(curl -sf -F "file=@$ROOT/examples/en_low.flac" -F "transcript=The quiet harbour woke slowly as the first boats went out." \
    "http://127.0.0.1:$port/v1/audio/voices") || fail "voice creation"
voice_s=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
voice_id=$(json_field id <<< "$voice")
curl -sf -o "$WORK/a.wav" -H 'Content-Type: application/json' "http://127.0.0.1:$port/v1/audio/speech" \
    -d "{\"input\": \"Hello from inside the container.\", \"voice\": \"$voice_id\", \"response_format\": \"wav\", \"seed\": 1}" \
    || fail "speech"
[ "$(head -c 4 "$WORK/a.wav")" = RIFF ] && [ "$(stat -c %s "$WORK/a.wav")" -gt 10000 ] || fail "speech is not a WAV"
pass "voice $voice_id stored (first prompt, cold numba cache: $voice_s s) and speech answered ($(stat -c %s "$WORK/a.wav") bytes of WAV)"
deadline=$(( $(date +%s) + 120 ))
until [ "$(docker inspect -f '{{.State.Health.Status}}' "$RUN_ID-a")" = healthy ]; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "healthcheck: $(docker inspect -f '{{json .State.Health}}' "$RUN_ID-a" | tail -c 400)"
    sleep 2
done
pass "healthcheck healthy ($(docker inspect -f '{{json .Config.Healthcheck.Test}}' "$RUN_ID-a"))"
numba_files=$(docker exec "$RUN_ID-a" sh -c 'find /app/cache/numba -type f 2>/dev/null | wc -l')
[ "$numba_files" -gt 0 ] || fail "no numba cache files in /app/cache/numba"
pass "numba cache on the volume: $numba_files files in /app/cache/numba"
secrets=$(docker exec "$RUN_ID-a" sh -c 'find /app -maxdepth 3 \( -name ".env" -o -name ".env.*" -o -name ".git" -o -name "*.pem" -o -name "*.key" \) -print')
[ -z "$secrets" ] || fail "secret-looking files in the image: $secrets"
pass "no .env, .git or key files under /app"
docker rm -f -v "$RUN_ID-a" >/dev/null

# ---------------------------------------------------------------------------------------------- 3. new container, same volume
port=$(free_port)
docker run -d --name "$RUN_ID-b" --network host -e STUDIO_ENGINE=preview -e STUDIO_PORT="$port" \
    -v "$RUN_ID-cache:/app/cache" "$TAG" >/dev/null
wait_ready "$port" "$RUN_ID-b" 300
curl -sf "http://127.0.0.1:$port/v1/audio/voices/$voice_id" >/dev/null || fail "the voice is gone in a new container"
t0=$(date +%s.%N)
curl -sf -o /dev/null -F "file=@$ROOT/examples/en_high.flac" -F "transcript=Please remember to water the plants before you leave." \
    "http://127.0.0.1:$port/v1/audio/voices" || fail "voice creation in the new container"
voice2_s=$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")
curl -sf -o "$WORK/b.wav" -H 'Content-Type: application/json' "http://127.0.0.1:$port/v1/audio/speech" \
    -d "{\"input\": \"The voice survived the container.\", \"voice\": \"$voice_id\", \"response_format\": \"wav\"}" \
    || fail "speech in the new container"
pass "new container on the same volume serves voice $voice_id; its first new prompt took $voice2_s s (numba cache warm)"
docker rm -f -v "$RUN_ID-b" >/dev/null

# ---------------------------------------------------------------------------------------------- 4. compose download
mkdir -p "$WORK/models"
chmod 777 "$WORK/models"
set +e
STUDIO_MODELS="$WORK/models" "${COMPOSE[@]}" --profile tools run --rm download --check-only > "$WORK/download.log" 2>&1
code=$?
set -e
if grep -q -e Traceback -e ModuleNotFoundError "$WORK/download.log" || [ "$code" != 1 ] \
        || ! grep -q "config.json: missing" "$WORK/download.log"; then
    cat "$WORK/download.log"
    fail "compose download --check-only (exit $code)"
fi
pass "compose download --check-only ran in the image: exit 1, '$(grep -m1 'missing' "$WORK/download.log" | sed 's/^ *//')'"
"${COMPOSE[@]}" down --volumes --remove-orphans >/dev/null 2>&1 || true

say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
say "all checks passed"
