#!/usr/bin/env bash
# Footprint of one uplink agent: its resident memory (RSS and PSS) and CPU
# time, first idle, then with 50 of its containers to monitor.
#
# The script builds the agent as shipped to hosts (`cargo build --profile
# agent --no-default-features`: no backend, optimized for size, one code
# unit) and the full release binary for the backend, starts a backend on
# 127.0.0.1 and one agent process with the default settings and
# --metrics-interval 10s
# (host, container and self metrics every 10 s, sent on the gRPC rung),
# and waits until the agent has enrolled and connected. Then:
#
#   1. idle: the agent runs with no container of its own; after a warm-up
#      its memory and CPU are measured for FOOTPRINT_SECS seconds;
#   2. with containers: FOOTPRINT_CONTAINERS containers (busybox, `sleep`)
#      are started with the label uplink.agent=<agent id>, which makes them
#      this agent's to monitor; after a warm-up that lets the container
#      source read all of them, the same is measured again.
#
# Memory is sampled once a second from /proc/<pid>/status (VmRSS, split
# into RssAnon, the heap and stacks, and RssFile, mostly the binary's pages;
# VmHWM, the peak RSS) and /proc/<pid>/smaps_rollup (Pss, which divides
# shared pages among the processes that map them); the table shows the
# mean and the largest sample. CPU is the agent's utime + stime from
# /proc/<pid>/stat over the whole window (threads that ended included), as
# a percentage of one core; its resolution is one clock tick (10 ms) per
# window, 0.017% over 60 s.
# The backend's /metrics shows whether the containers were monitored: the
# last column counts the agent's container_cpu_usage_seconds_total series
# the backend holds.
#
# Everything (processes, containers, files) is removed on exit, also on
# Ctrl-C. The script installs nothing; it needs cargo, docker (with the
# engine running and this user allowed to use it), curl and /proc. The
# image is uplink-test/busybox:1, built from the host's /bin/busybox as
# testkit/src/docker.rs builds it when missing, or FOOTPRINT_IMAGE.
#
# Run:      bash benches/footprint.sh
# Settings (environment):
#   FOOTPRINT_SECS        length of each measurement window, s (default 60)
#   FOOTPRINT_WARMUP_SECS wait before each window, s (default 20)
#   FOOTPRINT_CONTAINERS  containers in the second phase (default 50)
#   FOOTPRINT_INTERVAL    --metrics-interval of the agent (default 10s)
#   FOOTPRINT_IMAGE       image of the containers (default uplink-test/busybox:1)
#   UPLINK_BIN            the agent's binary, instead of building the agent
#                         build (--profile agent --no-default-features)
#   UPLINK_BACKEND_BIN    the backend's binary, instead of building the
#                         release build
#   CARGO_TARGET_DIR      where cargo builds (default ./target)

set -euo pipefail

SECS=${FOOTPRINT_SECS:-60}
WARMUP=${FOOTPRINT_WARMUP_SECS:-20}
CONTAINERS=${FOOTPRINT_CONTAINERS:-50}
INTERVAL=${FOOTPRINT_INTERVAL:-10s}
IMAGE=${FOOTPRINT_IMAGE:-uplink-test/busybox:1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() {
    echo "footprint: $*" >&2
    exit 1
}

for tool in docker curl getconf; do
    command -v "$tool" >/dev/null || die "$tool is needed and not installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info fails)"

TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -n ${UPLINK_BIN:-} ]]; then
    BIN=$UPLINK_BIN
else
    echo "building the agent (cargo build --profile agent --no-default-features) ..."
    (cd "$ROOT" && cargo build --profile agent --no-default-features --quiet --bin uplink)
    BIN=$TARGET/agent/uplink
fi
[[ -x $BIN ]] || die "no uplink binary at $BIN"
if [[ -n ${UPLINK_BACKEND_BIN:-} ]]; then
    BACKEND_BIN=$UPLINK_BACKEND_BIN
else
    echo "building the backend (cargo build --release) ..."
    (cd "$ROOT" && cargo build --release --quiet --bin uplink)
    BACKEND_BIN=$TARGET/release/uplink
fi
[[ -x $BACKEND_BIN ]] || die "no uplink binary at $BACKEND_BIN"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/uplink-footprint.XXXXXX")
RUN_ID=$(basename "$WORK")
BACKEND_PID=""
AGENT_PID=""

cleanup() {
    set +e
    if docker ps -aq --filter "label=uplink.footprint=$RUN_ID" | grep -q .; then
        echo "removing the containers ..."
        docker ps -aq --filter "label=uplink.footprint=$RUN_ID" | xargs -r docker rm -f >/dev/null 2>&1
    fi
    for pid in $AGENT_PID $BACKEND_PID; do
        kill "$pid" 2>/dev/null
    done
    # The agent gives running work and unsent metrics a few seconds.
    for pid in $AGENT_PID $BACKEND_PID; do
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

token() { echo "$1$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"; }
ADMIN=$(token upl_a_)
ENROLL=$(token upl_e_)

# The image, built as the tests build it when it is missing.
if ! docker image inspect "$IMAGE" >/dev/null 2>&1; then
    [[ $IMAGE == uplink-test/busybox:1 ]] || die "image $IMAGE is not present"
    [[ -x /bin/busybox ]] || die "/bin/busybox (busybox-static) is needed to build $IMAGE"
    echo "building $IMAGE ..."
    mkdir -p "$WORK/image"
    cp /bin/busybox "$WORK/image/busybox"
    printf 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\nCMD ["/bin/sh"]\n' \
        >"$WORK/image/Dockerfile"
    docker build -q -t "$IMAGE" "$WORK/image" >/dev/null
fi

# The backend, on a free port of 127.0.0.1, from a copy of the binary: the
# agent's PSS then shares its binary's pages with no other process.
cp "$BACKEND_BIN" "$WORK/uplink-backend"
"$WORK/uplink-backend" backend --listen 127.0.0.1:0 --data-dir "$WORK/backend" --hostname 127.0.0.1 \
    --admin-token "$ADMIN" --enroll-token "$ENROLL" \
    >"$WORK/backend.out" 2>"$WORK/backend.log" &
BACKEND_PID=$!
disown "$BACKEND_PID"
URL=""
for _ in $(seq 100); do
    URL=$(sed -n 's/^uplink backend listening on .* (\(https:[^)]*\)).*/\1/p' "$WORK/backend.out")
    [[ -n $URL ]] && break
    kill -0 "$BACKEND_PID" 2>/dev/null || die "the backend exited: $(cat "$WORK/backend.log")"
    sleep 0.1
done
[[ -n $URL ]] || die "the backend did not start within 10 s"
CA=$WORK/backend/ca.pem

# One agent with the default settings and the metrics interval asked for.
# The containers are none of its commands', so it would remove them as
# orphans after --orphan-grace (10 min by default): a longer run keeps them
# by raising it, which changes nothing else.
EXTRA=()
RUN_SECS=$((2 * WARMUP + 2 * SECS + 120))
if ((RUN_SECS > 600)); then
    EXTRA=(--orphan-grace "${RUN_SECS}s")
fi
UPLINK_TOKEN=$ENROLL "$BIN" agent --backend "$URL" --ca-file "$CA" \
    --state-dir "$WORK/agent" --hostname footprint --metrics-interval "$INTERVAL" \
    "${EXTRA[@]}" >"$WORK/agent.out" 2>"$WORK/agent.log" &
AGENT_PID=$!
disown "$AGENT_PID"
AGENT_ID=""
for _ in $(seq 200); do
    if [[ -s $WORK/agent/identity.json ]]; then
        AGENT_ID=$(sed -n 's/.*"agent_id": *"\([^"]*\)".*/\1/p' "$WORK/agent/identity.json")
    fi
    [[ -n $AGENT_ID ]] && break
    kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited: $(cat "$WORK/agent.log")"
    sleep 0.1
done
[[ -n $AGENT_ID ]] || die "the agent did not enroll within 20 s"

HZ=$(getconf CLK_TCK)

# CPU ticks (utime + stime) of a process; fields counted after the ')' that
# closes its name.
ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/$3"; }

# Series of this agent's containers that the backend shows at /metrics.
monitored() {
    curl -s --cacert "$CA" -H "authorization: Bearer $ADMIN" "$URL/metrics" |
        grep -c "^container_cpu_usage_seconds_total{agent=\"$AGENT_ID\"" || true
}

ROWS=()

# measure NAME: samples memory every second for SECS seconds and adds a row.
measure() {
    local name=$1 t0 t1 start end n=0 rss_sum=0 rss_max=0 pss_sum=0 pss_max=0 rss pss
    local anon_sum=0 file_sum=0
    kill -0 "$AGENT_PID" 2>/dev/null || die "the agent exited: $(tail -5 "$WORK/agent.log")"
    echo "measuring: $name, $SECS s ..."
    t0=$(ticks "$AGENT_PID")
    start=$(date +%s.%N)
    for _ in $(seq "$SECS"); do
        sleep 1
        rss=$(kib "$AGENT_PID" VmRSS status)
        pss=$(kib "$AGENT_PID" Pss smaps_rollup)
        anon_sum=$((anon_sum + $(kib "$AGENT_PID" RssAnon status)))
        file_sum=$((file_sum + $(kib "$AGENT_PID" RssFile status)))
        n=$((n + 1))
        rss_sum=$((rss_sum + rss))
        pss_sum=$((pss_sum + pss))
        ((rss > rss_max)) && rss_max=$rss
        ((pss > pss_max)) && pss_max=$pss
    done
    t1=$(ticks "$AGENT_PID")
    end=$(date +%s.%N)
    local hwm threads series
    hwm=$(kib "$AGENT_PID" VmHWM status)
    threads=$(awk '$1 == "Threads:" { print $2 }' "/proc/$AGENT_PID/status")
    series=$(monitored)
    ROWS+=("$(awk -v name="$name" -v n="$n" -v rs="$rss_sum" -v rm="$rss_max" -v ps="$pss_sum" \
        -v pm="$pss_max" -v hwm="$hwm" -v dt="$((t1 - t0))" -v hz="$HZ" -v s="$start" -v e="$end" \
        -v th="$threads" -v se="$series" -v an="$anon_sum" -v fi="$file_sum" 'BEGIN {
            m = 1024
            printf "| %-16s | %7.2f | %7.2f | %8.2f | %8.2f | %7.2f | %7.2f | %8.2f | %7.3f | %8.2f | %7d | %6d |",
                name, rs / n / m, rm / m, an / n / m, fi / n / m, ps / n / m, pm / m, hwm / m,
                100 * dt / hz / (e - s), dt / hz, th, se
        }')")
}

echo "backend $URL, agent $AGENT_ID (pid $AGENT_PID), metrics every $INTERVAL"
echo "warming up for $WARMUP s ..."
sleep "$WARMUP"
measure "idle"

echo "starting $CONTAINERS containers of the agent ($IMAGE) ..."
for i in $(seq "$CONTAINERS"); do
    docker run -d --name "uplink-footprint-$RUN_ID-$i" \
        --label "uplink.agent=$AGENT_ID" --label "uplink.footprint=$RUN_ID" \
        --memory 32m "$IMAGE" sleep 86400 >/dev/null
done
echo "warming up for $WARMUP s ..."
sleep "$WARMUP"
measure "$CONTAINERS containers"

echo
echo "uplink agent footprint: $(uname -r), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "mean and max of one sample per second over $SECS s; CPU as % of one core over the window"
echo
echo "| phase            | RSS MiB | RSS max | anon MiB | file MiB | PSS MiB | PSS max | peak RSS |   CPU % | CPU s    | threads | series |"
echo "|------------------|--------:|--------:|---------:|---------:|--------:|--------:|---------:|--------:|---------:|--------:|-------:|"
for row in "${ROWS[@]}"; do
    echo "$row"
done
echo
echo "series: the agent's container_cpu_usage_seconds_total series at the backend's /metrics (one per monitored container)"
echo "goals: RSS at most 10 MiB, CPU at most 0.1% of a core when idle"
