#!/usr/bin/env bash
# Tern data-path benchmark against raw veth (the baseline) and, where they
# are installed, Nebula, wireguard-go and boringtun, in network namespaces
# this script creates and always removes.
#
#   sudo bash netns-tests/bench.sh [--systems raw,tern,nebula,wggo,boringtun]
#       [--seconds N] [--reps N] [--pings N] [--quick] [--write]
#
# Lab (all addresses from 198.18.0.0/24 and 100.64.0.0/10; nothing is added
# to the root namespace):
#
#   tb-wan  bridge br0
#   tb-lh   198.18.0.1/24  lighthouses: tern (UDP 4242, overlay 100.64.0.1),
#                          nebula (UDP 4243, overlay 100.65.0.1, no TUN)
#   tb-a    198.18.0.2/24  node a of each system; iperf3/ping client
#   tb-b    198.18.0.3/24  node b of each system; iperf3 server
#
#   system     device in a / b        overlay a / b             UDP
#   raw        eth0 / eth0            198.18.0.2 / 198.18.0.3   -
#   tern       tern0 / tern0          100.64.0.5 / .6 (/10)     4242
#   nebula     nebula0 / nebula0      100.65.0.5 / .6 (/16)     4243
#   wggo       tb-wggo-a / tb-wggo-b  100.66.0.5 / .6 (/24)     51820
#   boringtun  tb-btun-a / tb-btun-b  100.67.0.5 / .6 (/24)     51821
#
# Every system's daemons are up at once (each with its own device, port and
# overlay subnet; the longest prefix wins over tern's /10). The WireGuard
# daemons' UAPI sockets live in /var/run/wireguard, which all namespaces
# share: hence a device name per node.
#
# For every repetition, every system in turn (interleaved: raw, tern, nebula,
# ..., raw, tern, ...):
#   - ping a -> b (per-packet RTTs: min, p50, avg, p99, max, loss);
#   - iperf3 TCP a -> b and b -> a (-R), one stream and four (-P 4), N
#     seconds each; during each run: the system's daemons' CPU seconds
#     (utime+stime from /proc/<pid>/stat), the whole machine's busy CPU
#     seconds (/proc/stat), UDP RcvbufErrors in tb-a and tb-b
#     (/proc/net/snmp, delta), the system's interface drops, and the bytes on
#     the other systems' devices (a run fails if its traffic went through
#     another tunnel);
#   - the daemons' VmRSS once at idle (before the first run) and once after
#     all runs.
# Prints a Markdown table (median (min-max) per system, ratios of medians:
# tern/raw and tern/peer for each peer); --write also puts it into
# BENCHMARKS.md between <!-- bench:core:start --> and <!-- bench:core:end -->.
#
# Exit codes: 0 done, 1 a step failed, 2 a prerequisite is missing.
#
# Adding a system: write system_<name>_check (prints why it cannot run and
# fails when it is not installed), system_<name>_setup (start its daemons in
# tb-a and tb-b, with their own UDP port, TUN name and overlay subnet,
# register their PIDs with `spawn`, wait for its tunnel with
# `wait_for_ping`), system_<name>_target (b's address as seen from a),
# system_<name>_pids ("a=PID b=PID", the daemons whose CPU and RSS count),
# system_<name>_ifaces ("ns:dev ...", the interfaces whose drops count) and
# system_<name>_version, then add <name> to ALL_SYSTEMS and SYSTEM_LABEL.

set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)

# In the order they run and appear in the table; raw is the baseline, tern
# the system every ratio is about, the rest are peers run only if installed.
ALL_SYSTEMS=(raw tern nebula wggo boringtun)
PEER_SYSTEMS=(nebula wggo boringtun)
declare -A SYSTEM_LABEL=([raw]="raw veth" [tern]="tern" [nebula]="nebula"
    [wggo]="wireguard-go" [boringtun]="boringtun")

NS_WAN=tb-wan
NS_LH=tb-lh
NS_A=tb-a
NS_B=tb-b
LH_UNDERLAY=198.18.0.1
A_UNDERLAY=198.18.0.2
B_UNDERLAY=198.18.0.3
TERN_A_OVERLAY=100.64.0.5
TERN_B_OVERLAY=100.64.0.6
NEBULA_LH_OVERLAY=100.65.0.1
NEBULA_A_OVERLAY=100.65.0.5
NEBULA_B_OVERLAY=100.65.0.6
NEBULA_PORT=4243
WGGO_NET=100.66.0      # a is .5, b is .6, /24
WGGO_PORT=51820
BTUN_NET=100.67.0
BTUN_PORT=51821
TUN_MTU=1420           # every tunnel's MTU, tern's included
WG_SOCK_DIR=/var/run/wireguard
IPERF_PORT=5201
PARALLEL=4             # streams of the multi-stream iperf3 runs
TUNNEL_WAIT_SECS=20

usage() {
    cat <<'EOF'
Usage: bash netns-tests/bench.sh [options]   (as root)

  --systems LIST  comma-separated, from raw,tern,nebula,wggo,boringtun
                  (default: raw, tern and every installed peer; raw and tern
                  only with --quick); a peer that is not installed is skipped
  --seconds N     length of each iperf3 run in seconds (default 10)
  --reps N        repetitions, interleaved across systems (default 3)
  --pings N       pings per RTT measurement (default 200, 50 with --quick)
  --quick         3 s runs, 1 repetition, 50 pings (CI smoke test)
  --write         also write the result into BENCHMARKS.md
  -h, --help      this text

Binaries: $TERN_BIN_DIR/{tern,tern-lighthouse}, by default target/release
(build them with `cargo build --release --workspace`).
Peers: nebula and nebula-cert on PATH (apt-get install nebula); wireguard-go
and wg on PATH (apt-get install wireguard-go wireguard-tools); boringtun-cli
at $BORINGTUN_BIN, by default /opt/boringtun/bin/boringtun-cli or on PATH
(cargo install boringtun-cli), and wg.
EOF
}

log() { printf 'bench: %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }
missing() { printf 'bench: %s\n' "$*" >&2; exit 2; }

# --- Options -----------------------------------------------------------------
ORIG_ARGS=("$@")
RUN_SECS=""
REPS=""
PINGS=""
QUICK=0
WRITE=0
SYSTEMS_ARG=""
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
while (($#)); do
    case $1 in
        --seconds) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; RUN_SECS=$2; shift 2 ;;
        --seconds=*) RUN_SECS=${1#*=}; shift ;;
        --reps) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; REPS=$2; shift 2 ;;
        --reps=*) REPS=${1#*=}; shift ;;
        --pings) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; PINGS=$2; shift 2 ;;
        --pings=*) PINGS=${1#*=}; shift ;;
        --systems) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; SYSTEMS_ARG=$2; shift 2 ;;
        --systems=*) SYSTEMS_ARG=${1#*=}; shift ;;
        --quick) QUICK=1; shift ;;
        --write) WRITE=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'bench: unknown option %q\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done
if ((QUICK)); then
    : "${RUN_SECS:=3}" "${REPS:=1}" "${PINGS:=50}"
else
    : "${RUN_SECS:=10}" "${REPS:=3}" "${PINGS:=200}"
fi
is_uint "$RUN_SECS" && ((RUN_SECS >= 1 && RUN_SECS <= 600)) || missing "--seconds must be 1 to 600"
is_uint "$REPS" && ((REPS >= 1 && REPS <= 20)) || missing "--reps must be 1 to 20"
is_uint "$PINGS" && ((PINGS >= 10 && PINGS <= 5000)) || missing "--pings must be 10 to 5000"

# --- Prerequisites -----------------------------------------------------------
[[ $(id -u) -eq 0 ]] || missing "needs root (network namespaces, TUN devices): run it with sudo"
for tool in ip ping python3 getconf timeout flock setsid ss awk; do
    command -v "$tool" >/dev/null || missing "needs '$tool' on PATH (Debian: iproute2, iputils-ping, python3, coreutils, util-linux, gawk)"
done
if ! command -v iperf3 >/dev/null; then
    command -v apt-get >/dev/null || missing "needs iperf3 (apt-get install -y iperf3)"
    log "iperf3 missing: installing it with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >&2; then
        DEBIAN_FRONTEND=noninteractive apt-get update >&2 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y iperf3 >&2 ||
            missing "could not install iperf3 (apt-get install -y iperf3)"
    fi
fi
BIN_DIR=${TERN_BIN_DIR:-$REPO/target/release}
[[ $BIN_DIR == /* ]] || BIN_DIR=$PWD/$BIN_DIR # tern cert runs in $WORKDIR
TERN=$BIN_DIR/tern
TERN_LH=$BIN_DIR/tern-lighthouse
if [[ -n ${BORINGTUN_BIN:-} ]]; then
    BTUN=$BORINGTUN_BIN
elif [[ -x /opt/boringtun/bin/boringtun-cli ]]; then
    BTUN=/opt/boringtun/bin/boringtun-cli
else
    BTUN=$(command -v boringtun-cli || echo /opt/boringtun/bin/boringtun-cli)
fi

# system_<name>_check: fails, saying why, when the system cannot run here.
system_raw_check() { :; }
system_tern_check() {
    local bin
    for bin in "$TERN" "$TERN_LH"; do
        [[ -x $bin ]] || { echo "$bin not found: \`cargo build --release --workspace\` is needed first (or set TERN_BIN_DIR)"; return 1; }
    done
}
system_nebula_check() {
    if ! command -v nebula >/dev/null || ! command -v nebula-cert >/dev/null; then
        echo "nebula or nebula-cert not on PATH (apt-get install nebula)"
        return 1
    fi
}
system_wggo_check() {
    if ! command -v wireguard-go >/dev/null || ! command -v wg >/dev/null; then
        echo "wireguard-go or wg not on PATH (apt-get install wireguard-go wireguard-tools)"
        return 1
    fi
}
system_boringtun_check() {
    [[ -x $BTUN ]] || { echo "$BTUN not found (cargo install boringtun-cli, or set BORINGTUN_BIN)"; return 1; }
    command -v wg >/dev/null || { echo "wg not on PATH (apt-get install wireguard-tools)"; return 1; }
}

# Which systems: --systems, else raw and tern plus (without --quick) every
# installed peer. Tern requested but not built is an error; a peer that is
# not installed is skipped, visibly.
if [[ -n $SYSTEMS_ARG ]]; then
    IFS=, read -ra wanted <<<"$SYSTEMS_ARG"
    for w in "${wanted[@]}"; do
        [[ -n ${SYSTEM_LABEL[$w]+x} ]] || { printf 'bench: unknown system %q in --systems (known: %s)\n' "$w" "${ALL_SYSTEMS[*]}" >&2; exit 2; }
    done
elif ((QUICK)); then
    wanted=(raw tern)
else
    wanted=("${ALL_SYSTEMS[@]}")
fi
SYSTEMS=()
for sys in "${ALL_SYSTEMS[@]}"; do
    [[ " ${wanted[*]} " == *" $sys "* ]] || continue
    if ! why=$(system_"$sys"_check); then
        [[ " ${PEER_SYSTEMS[*]} " == *" $sys "* ]] || missing "$why"
        log "skipping ${SYSTEM_LABEL[$sys]}: $why"
        continue
    fi
    SYSTEMS+=("$sys")
done
((${#SYSTEMS[@]})) || missing "no system to measure (--systems ${SYSTEMS_ARG:-?})"
has_system() { [[ " ${SYSTEMS[*]} " == *" $1 "* ]]; }
log "systems: ${SYSTEMS[*]}"
CLK_TCK=$(getconf CLK_TCK)
is_uint "$CLK_TCK" && ((CLK_TCK > 0)) || die "getconf CLK_TCK gave '$CLK_TCK'"

# One run at a time (the namespace names are fixed): a lock on this script.
exec 9<"${BASH_SOURCE[0]}"
flock -n 9 || missing "another bench.sh run is in progress (it holds a lock on ${BASH_SOURCE[0]})"

# --- Cleanup: only what this run made ---------------------------------------
WORKDIR=""
PIDS=()          # every background process this run started (our children)
declare -A PID_NAME=()
CREATED_NS=()
WG_SOCKS=()      # UAPI sockets our WireGuard daemons bind (boringtun leaves its own behind)
WG_SOCK_DIR_MADE=0

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    local pid i alive
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    # Up to 3 s for them to stop (TERM makes tern remove its TUN device).
    for ((i = 0; i < 30; i++)); do
        alive=0
        for pid in "${PIDS[@]}"; do
            # Not yet reaped, so the PID cannot belong to anyone else.
            if kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
                alive=1
            fi
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]]; then
            log "${PID_NAME[$pid]:-pid $pid} ignored SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    local sock
    for sock in "${WG_SOCKS[@]}"; do
        rm -f "$sock"
    done
    ((WG_SOCK_DIR_MADE)) && rmdir "$WG_SOCK_DIR" 2>/dev/null
    for ((i = ${#CREATED_NS[@]} - 1; i >= 0; i--)); do
        ip netns del "${CREATED_NS[i]}" 2>/dev/null || log "could not delete namespace ${CREATED_NS[i]}"
    done
    if [[ -n $WORKDIR && -d $WORKDIR ]]; then
        if ((rc != 0)); then
            local f
            for f in "$WORKDIR"/*.log; do
                [[ -s $f ]] || continue
                printf -- '--- %s (last 30 lines) ---\n' "$(basename "$f")" >&2
                tail -n 30 "$f" >&2
            done
        fi
        rm -rf "$WORKDIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

WORKDIR=$(mktemp -d /tmp/tern-bench.XXXXXX)
RESULTS=$WORKDIR/results.tsv
: >"$RESULTS"

# Starts "$@" in the background with its output in $WORKDIR/<name>.log and
# remembers its PID under <name>. `setsid` (which does not fork here: a
# background job of a script is no process-group leader) keeps a terminal's
# Ctrl-C away from the daemons, so the trap stops them in order; `ip netns
# exec` execs the command, so the PID is the daemon's own.
declare -A PID_OF=()
spawn() {
    local name=$1
    shift
    setsid "$@" >"$WORKDIR/$name.log" 2>&1 9>&- </dev/null &
    local pid=$!
    PIDS+=("$pid")
    PID_NAME[$pid]=$name
    PID_OF[$name]=$pid
}

# Runs "$@" (bounded by `timeout $1`) with stdout to file $2 and stderr
# appended to $WORKDIR/commands.log, and returns its exit code. It runs as
# a background job that the shell `wait`s for, so that SIGINT/SIGTERM reach
# the trap at once (a foreground job would defer them, or swallow SIGINT);
# cleanup ends it if the script stops meanwhile.
run_bounded() {
    local limit=$1 out=$2
    shift 2
    timeout "$limit" "$@" >"$out" 2>>"$WORKDIR/commands.log" 9>&- &
    local pid=$! rc=0 p keep=()
    PIDS+=("$pid")
    PID_NAME[$pid]="$*"
    wait "$pid" || rc=$?
    # Reaped: forget it, its PID may now be reused.
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
    return "$rc"
}

running() { # running PID: alive and not a zombie
    kill -0 "$1" 2>/dev/null && [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) != Z ]]
}

# --- Lab ---------------------------------------------------------------------
ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

for ns in "$NS_WAN" "$NS_LH" "$NS_A" "$NS_B"; do
    if ns_exists "$ns"; then
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        [[ -z ${pids// /} ]] || missing "namespace $ns exists with processes in it ($pids): not touching it"
        log "deleting namespace $ns left over from an earlier run (no process in it)"
        ip netns del "$ns"
    fi
done

add_ns() {
    ip netns add "$1"
    CREATED_NS+=("$1")
    ip -n "$1" link set lo up
}
# Plugs namespace $1 into the wan bridge as eth0 with address $3; $2 names
# the bridge port. The veth pair is created inside $1, its peer moved
# straight into the wan namespace.
connect_to_wan() {
    local ns=$1 port=$2 addr=$3
    ip netns exec "$ns" ip link add eth0 type veth peer name "$port" netns "$NS_WAN"
    ip -n "$NS_WAN" link set "$port" master br0
    ip -n "$NS_WAN" link set "$port" up
    ip -n "$ns" addr add "$addr" dev eth0
    ip -n "$ns" link set eth0 up
}

log "building the lab in $NS_WAN, $NS_LH, $NS_A, $NS_B"
add_ns "$NS_WAN"
ip -n "$NS_WAN" link add br0 type bridge
ip -n "$NS_WAN" link set br0 up
add_ns "$NS_LH"
add_ns "$NS_A"
add_ns "$NS_B"
connect_to_wan "$NS_LH" lh0 "$LH_UNDERLAY/24"
connect_to_wan "$NS_A" a0 "$A_UNDERLAY/24"
connect_to_wan "$NS_B" b0 "$B_UNDERLAY/24"

# Pings $2 from namespace $1 until one answer, at most $3 seconds.
wait_for_ping() {
    local ns=$1 dst=$2 limit=$3 tries=0
    local deadline=$((SECONDS + limit))
    while ((tries < limit * 2 + 2)); do
        if ip netns exec "$ns" ping -c1 -W1 -q "$dst" >/dev/null 2>&1; then
            return 0
        fi
        ((SECONDS < deadline)) || break
        tries=$((tries + 1))
        sleep 0.2
    done
    die "no ping answer from $dst in $ns within ${limit} s"
}

# --- Systems -------------------------------------------------------------------
# raw veth: the underlay itself, a's eth0 -> br0 -> b's eth0; no daemon.
system_raw_setup() { wait_for_ping "$NS_A" "$B_UNDERLAY" 5; }
system_raw_target() { echo "$B_UNDERLAY"; }
system_raw_pids() { echo ""; }
system_raw_ifaces() { echo "$NS_A:eth0 $NS_B:eth0"; }
system_raw_version() { echo ""; }

# tern: lighthouse in tb-lh, nodes a and b; traffic a -> tern0 -> UDP 4242
# over the same veth/bridge path -> tern0 on b.
tern_cert() { (cd "$WORKDIR" && "$TERN" cert "$@" >>"$WORKDIR/cert.log" 2>&1) || die "tern cert $* failed (see cert.log)"; }
tern_node_config() { # name
    cat >"$WORKDIR/$1.toml" <<EOF
[pki]
ca = "ca.crt"
cert = "$1.crt"
key = "$1.key"
[listen]
addr = "0.0.0.0:4242"
[[lighthouses]]
endpoint = "$LH_UNDERLAY:4242"
[tun]
name = "tern0"
mtu = $TUN_MTU
[api]
socket = "$WORKDIR/$1.sock"
[log]
level = "warn"
[dns]
configure_system = false
[[firewall.inbound]]
proto = "any"
EOF
}
system_tern_setup() {
    tern_cert ca --name tern-bench --out-crt ca.crt --out-key ca.key
    tern_cert sign --ca-crt ca.crt --ca-key ca.key --name lh --ip 100.64.0.1/10 --groups lighthouse --out-key lh.key --out-crt lh.crt
    tern_cert sign --ca-crt ca.crt --ca-key ca.key --name a --ip "$TERN_A_OVERLAY/10" --out-key a.key --out-crt a.crt
    tern_cert sign --ca-crt ca.crt --ca-key ca.key --name b --ip "$TERN_B_OVERLAY/10" --out-key b.key --out-crt b.crt
    cat >"$WORKDIR/lighthouse.toml" <<EOF
[pki]
ca = "ca.crt"
cert = "lh.crt"
key = "lh.key"
[listen]
addr = "0.0.0.0:4242"
[api]
socket = "$WORKDIR/lh.sock"
[log]
level = "warn"
EOF
    tern_node_config a
    tern_node_config b
    spawn tern-lighthouse ip netns exec "$NS_LH" "$TERN_LH" --config "$WORKDIR/lighthouse.toml"
    spawn tern-a ip netns exec "$NS_A" "$TERN" up --config "$WORKDIR/a.toml"
    spawn tern-b ip netns exec "$NS_B" "$TERN" up --config "$WORKDIR/b.toml"
    wait_for_ping "$NS_A" "$TERN_B_OVERLAY" "$TUNNEL_WAIT_SECS"
    wait_for_ping "$NS_B" "$TERN_A_OVERLAY" 5
    local name
    for name in tern-lighthouse tern-a tern-b; do
        running "${PID_OF[$name]}" || die "$name exited"
    done
}
system_tern_target() { echo "$TERN_B_OVERLAY"; }
system_tern_pids() { echo "a=${PID_OF[tern-a]} b=${PID_OF[tern-b]}"; }
system_tern_ifaces() { echo "$NS_A:tern0 $NS_B:tern0"; }
system_tern_version() { "$TERN" --version 2>/dev/null | head -n 1 || true; }

# nebula: lighthouse in tb-lh (no TUN), nodes a and b with nebula0, UDP 4243.
# Nodes advertise only their eth0 addresses, and accept only underlay ones,
# so that nebula cannot pick a path through another system's tunnel.
nebula_config() { # name: lh, a or b
    local name=$1 dir=$WORKDIR/nebula lh=false no_tun=false hosts
    if [[ $name == lh ]]; then
        lh=true no_tun=true hosts="[]"
    else
        hosts="[\"$NEBULA_LH_OVERLAY\"]"
    fi
    cat >"$dir/$name.yml" <<EOF
pki:
  ca: $dir/ca.crt
  cert: $dir/$name.crt
  key: $dir/$name.key
static_host_map:
  "$NEBULA_LH_OVERLAY": ["$LH_UNDERLAY:$NEBULA_PORT"]
lighthouse:
  am_lighthouse: $lh
  interval: 60
  hosts: $hosts
  local_allow_list:
    interfaces:
      eth0: true
  remote_allow_list:
    "198.18.0.0/16": true
listen:
  host: 0.0.0.0
  port: $NEBULA_PORT
  # The same 4 MiB socket buffers tern asks for (nebula's own knob; the
  # WireGuard daemons have none).
  read_buffer: 4194304
  write_buffer: 4194304
punchy:
  punch: false
tun:
  disabled: $no_tun
  dev: nebula0
  mtu: $TUN_MTU
  drop_local_broadcast: false
  drop_multicast: false
logging:
  level: warning
  format: text
firewall:
  outbound:
    - port: any
      proto: any
      host: any
  inbound:
    - port: any
      proto: any
      host: any
EOF
}
nebula_cert() { (cd "$WORKDIR/nebula" && nebula-cert "$@" >>"$WORKDIR/cert.log" 2>&1) || die "nebula-cert $* failed (see cert.log)"; }
system_nebula_setup() {
    mkdir -p "$WORKDIR/nebula"
    nebula_cert ca -name tern-bench-nebula -out-crt ca.crt -out-key ca.key
    nebula_cert sign -ca-crt ca.crt -ca-key ca.key -name lh -ip "$NEBULA_LH_OVERLAY/16" -out-crt lh.crt -out-key lh.key
    nebula_cert sign -ca-crt ca.crt -ca-key ca.key -name a -ip "$NEBULA_A_OVERLAY/16" -out-crt a.crt -out-key a.key
    nebula_cert sign -ca-crt ca.crt -ca-key ca.key -name b -ip "$NEBULA_B_OVERLAY/16" -out-crt b.crt -out-key b.key
    local name
    for name in lh a b; do nebula_config "$name"; done
    spawn nebula-lighthouse ip netns exec "$NS_LH" nebula -config "$WORKDIR/nebula/lh.yml"
    spawn nebula-a ip netns exec "$NS_A" nebula -config "$WORKDIR/nebula/a.yml"
    spawn nebula-b ip netns exec "$NS_B" nebula -config "$WORKDIR/nebula/b.yml"
    wait_for_ping "$NS_A" "$NEBULA_B_OVERLAY" "$TUNNEL_WAIT_SECS"
    wait_for_ping "$NS_B" "$NEBULA_A_OVERLAY" 5
    for name in nebula-lighthouse nebula-a nebula-b; do
        running "${PID_OF[$name]}" || die "$name exited"
    done
}
system_nebula_target() { echo "$NEBULA_B_OVERLAY"; }
system_nebula_pids() { echo "a=${PID_OF[nebula-a]} b=${PID_OF[nebula-b]}"; }
system_nebula_ifaces() { echo "$NS_A:nebula0 $NS_B:nebula0"; }
system_nebula_version() { nebula -version 2>/dev/null | awk '/Version/ { print "nebula " $2; exit }'; }

# WireGuard in userspace (wireguard-go, boringtun): a daemon per node, in the
# foreground so that its PID is ours, configured through its UAPI socket
# with `wg`; a point-to-point pair, endpoints on the underlay.

# Makes sure /var/run/wireguard/$1.sock is free for a daemon of ours and
# remembers it for cleanup. The directory is shared by all namespaces: a
# socket somebody answers on is not ours; one nobody answers on was left by
# a killed run (boringtun would silently replace either).
claim_uapi_socket() {
    local sock=$WG_SOCK_DIR/$1.sock
    if [[ ! -d $WG_SOCK_DIR ]]; then
        mkdir -m 0755 "$WG_SOCK_DIR"
        WG_SOCK_DIR_MADE=1
    fi
    if [[ -e $sock ]]; then
        if python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$sock" 2>/dev/null; then
            missing "$sock is in use by a process this run did not start: not touching it"
        fi
        log "removing $sock left over from an earlier run (nobody listens on it)"
        rm -f "$sock"
    fi
    WG_SOCKS+=("$sock")
}
# wg_pair SYS DEV_PREFIX PORT NET: after spawning SYS-a and SYS-b (devices
# DEV_PREFIX-a, DEV_PREFIX-b), gives them keys, peers and addresses
# NET.5 / NET.6, and waits for the tunnel.
wg_pair() {
    local sys=$1 prefix=$2 port=$3 net=$4 dir=$WORKDIR/$1 n ns peer host peer_host peer_ul i
    mkdir -p "$dir"
    for n in a b; do
        (umask 077 && wg genkey >"$dir/$n.key") || die "wg genkey failed"
        wg pubkey <"$dir/$n.key" >"$dir/$n.pub" || die "wg pubkey failed"
    done
    for n in a b; do
        ns=$NS_A peer=b host=5 peer_host=6 peer_ul=$B_UNDERLAY
        [[ $n == b ]] && ns=$NS_B peer=a host=6 peer_host=5 peer_ul=$A_UNDERLAY
        for ((i = 0; i < 100; i++)); do
            [[ -S $WG_SOCK_DIR/$prefix-$n.sock ]] && ip netns exec "$ns" wg show "$prefix-$n" >/dev/null 2>&1 && break
            running "${PID_OF[$sys-$n]}" || die "$sys-$n exited"
            sleep 0.1
        done
        ((i < 100)) || die "$sys-$n: no UAPI socket $WG_SOCK_DIR/$prefix-$n.sock after 10 s"
        ip netns exec "$ns" wg set "$prefix-$n" listen-port "$port" private-key "$dir/$n.key" \
            peer "$(<"$dir/$peer.pub")" endpoint "$peer_ul:$port" allowed-ips "$net.$peer_host/32" ||
            die "wg set $prefix-$n failed"
        ip -n "$ns" addr add "$net.$host/24" dev "$prefix-$n"
        ip -n "$ns" link set "$prefix-$n" mtu "$TUN_MTU" up
    done
    wait_for_ping "$NS_A" "$net.6" "$TUNNEL_WAIT_SECS"
    wait_for_ping "$NS_B" "$net.5" 5
    for n in a b; do
        running "${PID_OF[$sys-$n]}" || die "$sys-$n exited"
    done
}

# wireguard-go: -f keeps it in the foreground; WG_PROCESS_FOREGROUND=1 also
# spares its log the banner about the kernel module (which this lab lacks).
system_wggo_setup() {
    claim_uapi_socket tb-wggo-a
    claim_uapi_socket tb-wggo-b
    spawn wggo-a ip netns exec "$NS_A" env WG_PROCESS_FOREGROUND=1 wireguard-go -f tb-wggo-a
    spawn wggo-b ip netns exec "$NS_B" env WG_PROCESS_FOREGROUND=1 wireguard-go -f tb-wggo-b
    wg_pair wggo tb-wggo "$WGGO_PORT" "$WGGO_NET"
}
system_wggo_target() { echo "$WGGO_NET.6"; }
system_wggo_pids() { echo "a=${PID_OF[wggo-a]} b=${PID_OF[wggo-b]}"; }
system_wggo_ifaces() { echo "$NS_A:tb-wggo-a $NS_B:tb-wggo-b"; }
system_wggo_version() { wireguard-go --version 2>/dev/null | awk '/^wireguard-go/ { print $1 " " $2; exit }'; }

# boringtun-cli: --foreground; as root without sudo there is nobody to drop
# privileges to; its default of 4 threads is kept.
system_boringtun_setup() {
    claim_uapi_socket tb-btun-a
    claim_uapi_socket tb-btun-b
    spawn boringtun-a ip netns exec "$NS_A" "$BTUN" --foreground --disable-drop-privileges tb-btun-a
    spawn boringtun-b ip netns exec "$NS_B" "$BTUN" --foreground --disable-drop-privileges tb-btun-b
    wg_pair boringtun tb-btun "$BTUN_PORT" "$BTUN_NET"
}
system_boringtun_target() { echo "$BTUN_NET.6"; }
system_boringtun_pids() { echo "a=${PID_OF[boringtun-a]} b=${PID_OF[boringtun-b]}"; }
system_boringtun_ifaces() { echo "$NS_A:tb-btun-a $NS_B:tb-btun-b"; }
system_boringtun_version() { "$BTUN" --version 2>/dev/null | head -n 1 || true; }

# --- Measurements ------------------------------------------------------------
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

proc_ticks() { # utime+stime of a whole process (all threads), in clock ticks
    local stat rest
    stat=$(<"/proc/$1/stat") || die "cannot read /proc/$1/stat (${PID_NAME[$1]:-?} gone?)"
    rest=${stat##*) }
    # shellcheck disable=SC2086
    set -- $rest
    echo $((${12} + ${13}))
}
machine_busy_ticks() { # all CPUs: user+nice+system+irq+softirq+steal
    awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat
}
udp_rcvbuf_errors() { # RcvbufErrors in /proc/net/snmp of namespace $1
    ip netns exec "$1" cat /proc/net/snmp | awk '
        $1 == "Udp:" && !hdr { for (i = 2; i <= NF; i++) if ($i == "RcvbufErrors") col = i; hdr = 1; next }
        $1 == "Udp:" && hdr { print (col ? $col : 0); exit }'
}
iface_drops() { # "ns:dev ...": sum of tx_dropped + rx_dropped
    local spec total=0 v
    for spec in $1; do
        v=$(ip netns exec "${spec%%:*}" cat "/sys/class/net/${spec#*:}/statistics/tx_dropped" \
            "/sys/class/net/${spec#*:}/statistics/rx_dropped" | awk '{ s += $1 } END { print s + 0 }')
        total=$((total + v))
    done
    echo "$total"
}
iface_bytes() { # "ns:dev ...": sum of tx_bytes + rx_bytes
    local spec total=0 v
    for spec in $1; do
        v=$(ip netns exec "${spec%%:*}" cat "/sys/class/net/${spec#*:}/statistics/tx_bytes" \
            "/sys/class/net/${spec#*:}/statistics/rx_bytes" | awk '{ s += $1 } END { printf "%.0f", s }')
        total=$((total + v))
    done
    echo "$total"
}
other_ifaces() { # the tunnel devices of every system but $1 (raw has none of its own)
    local s out=""
    for s in "${SYSTEMS[@]}"; do
        [[ $s == "$1" || $s == raw ]] || out+=" $(system_"$s"_ifaces)"
    done
    echo "$out"
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
now_ns() { date +%s%N; }

run_ping() { # system
    local sys=$1 target out=$WORKDIR/ping.out
    target=$(system_"$sys"_target)
    run_bounded $((PINGS / 10 + 30)) "$out" ip netns exec "$NS_A" ping -n -c "$PINGS" -i 0.02 -W 1 "$target" ||
        die "ping $target from $NS_A failed for $sys: $(tail -n 3 "$out")"
    python3 -c '
import re, sys
text = sys.stdin.read()
times = sorted(float(t) for t in re.findall(r"time=([0-9.]+) ms", text))
summary = re.search(r"= ([0-9.]+)/([0-9.]+)/([0-9.]+)/", text)
loss = re.search(r"([0-9.]+)% packet loss", text)
if not times or not summary or not loss:
    sys.exit("cannot parse ping output")
def rank(p):  # nearest-rank percentile
    import math
    return times[max(0, math.ceil(p / 100 * len(times)) - 1)]
print("rtt_min", summary.group(1))
print("rtt_p50", rank(50))
print("rtt_avg", summary.group(2))
print("rtt_p99", rank(99))
print("rtt_max", summary.group(3))
print("ping_loss", loss.group(1))
' <"$out" | while read -r key value; do record "$sys" "$key" "$value"; done
}

# One iperf3 run; its figures are recorded under keys ending in $dir (fwd or
# rev) and, for more than one stream, the number of streams (fwd4, rev4).
run_iperf() { # system direction(fwd|rev) streams rep
    local sys=$1 dir=$2 streams=$3 rep=$4 target pids ifaces others json attempt ok=0
    local flags=(-P "$streams")
    target=$(system_"$sys"_target)
    pids=$(system_"$sys"_pids)
    ifaces=$(system_"$sys"_ifaces)
    others=$(other_ifaces "$sys")
    [[ $dir == rev ]] && flags+=(-R)
    ((streams > 1)) && dir+=$streams
    json=$WORKDIR/iperf-$sys-$dir-$rep.json
    local -A t0=() t1=()
    local m0 m1 u0 u1 i0 i1 o0 o1 w0 w1 kv name
    for attempt in 1 2 3; do
        for kv in $pids; do t0[${kv%%=*}]=$(proc_ticks "${kv#*=}"); done
        m0=$(machine_busy_ticks)
        u0=$(($(udp_rcvbuf_errors "$NS_A") + $(udp_rcvbuf_errors "$NS_B")))
        i0=$(iface_drops "$ifaces")
        o0=$(iface_bytes "$others")
        w0=$(now_ns)
        if run_bounded $((RUN_SECS + 30)) "$json" ip netns exec "$NS_A" \
            iperf3 -c "$target" -p "$IPERF_PORT" -t "$RUN_SECS" -J "${flags[@]}" --connect-timeout 5000; then
            ok=1
        fi
        w1=$(now_ns)
        m1=$(machine_busy_ticks)
        u1=$(($(udp_rcvbuf_errors "$NS_A") + $(udp_rcvbuf_errors "$NS_B")))
        i1=$(iface_drops "$ifaces")
        o1=$(iface_bytes "$others")
        for kv in $pids; do t1[${kv%%=*}]=$(proc_ticks "${kv#*=}"); done
        ((ok)) && break
        log "iperf3 $sys $dir failed (attempt $attempt): $(python3 -c 'import json,sys; print(json.load(sys.stdin).get("error","?"))' <"$json" 2>/dev/null || echo '?')"
        sleep 1
    done
    ((ok)) || die "iperf3 to $target ($sys, $dir) failed 3 times"
    local parsed bps bytes retr
    parsed=$(python3 -c '
import json, sys
end = json.load(sys.stdin)["end"]
recv, sent = end["sum_received"], end["sum_sent"]
print(recv["bits_per_second"], recv["bytes"], sent.get("retransmits", 0))
' <"$json") || die "cannot parse iperf3 JSON $json"
    read -r bps bytes retr <<<"$parsed"
    # All systems are up at once: a run whose packets crossed another
    # system's tunnel (a daemon choosing an overlay address as its path)
    # measured both; 1 MB allows for stray control traffic.
    if ((o1 - o0 > 1000000 + bytes / 100)); then
        die "$sys $dir: $((o1 - o0)) bytes went through other systems' devices ($others) during the run: its traffic took another tunnel"
    fi
    local wall total=0
    wall=$(awk -v a="$w0" -v b="$w1" 'BEGIN { printf "%.6f", (b - a) / 1e9 }')
    record "$sys" "tput_$dir" "$(awk -v v="$bps" 'BEGIN { printf "%.6f", v / 1e9 }')"
    record "$sys" "retr_$dir" "$retr"
    record "$sys" "udp_rcvbuf_$dir" "$((u1 - u0))"
    record "$sys" "if_drops_$dir" "$((i1 - i0))"
    record "$sys" "machine_busy_pct_$dir" "$(awk -v t=$((m1 - m0)) -v hz="$CLK_TCK" -v w="$wall" -v n="$(nproc)" 'BEGIN { printf "%.3f", 100 * t / hz / w / n }')"
    record "$sys" "machine_cpu_per_gb_$dir" "$(awk -v t=$((m1 - m0)) -v hz="$CLK_TCK" -v b="$bytes" 'BEGIN { printf "%.6f", t / hz / (b / 1e9) }')"
    if [[ -n $pids ]]; then
        for kv in $pids; do
            name=${kv%%=*}
            local d=$((t1[$name] - t0[$name]))
            total=$((total + d))
            record "$sys" "cpu_pct_${name}_$dir" "$(awk -v t="$d" -v hz="$CLK_TCK" -v w="$wall" 'BEGIN { printf "%.3f", 100 * t / hz / w }')"
        done
        record "$sys" "cpu_s_$dir" "$(awk -v t="$total" -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", t / hz }')"
        record "$sys" "cpu_per_gb_$dir" "$(awk -v t="$total" -v hz="$CLK_TCK" -v b="$bytes" 'BEGIN { printf "%.6f", t / hz / (b / 1e9) }')"
    fi
    log "  $sys $dir ($streams × TCP) rep $rep: $(awk -v v="$bps" 'BEGIN { printf "%.3f", v / 1e9 }') Gbit/s, $retr retransmits"
}

record_rss() { # system when(idle|after)
    local kv pids
    pids=$(system_"$1"_pids)
    for kv in $pids; do
        running "${kv#*=}" || die "$1 daemon ${kv%%=*} is gone"
        record "$1" "rss_${kv%%=*}_$2" "$(rss_kb "${kv#*=}")"
    done
}

# --- Run -----------------------------------------------------------------------
for sys in "${SYSTEMS[@]}"; do
    log "setting up ${SYSTEM_LABEL[$sys]}"
    system_"$sys"_setup
done

spawn iperf3-server ip netns exec "$NS_B" iperf3 -s -p "$IPERF_PORT"
for ((i = 0; i < 100; i++)); do
    [[ -n $(ip netns exec "$NS_B" ss -Hltn "sport = :$IPERF_PORT") ]] && break
    running "${PID_OF[iperf3-server]}" || die "iperf3 server exited"
    sleep 0.1
done
[[ -n $(ip netns exec "$NS_B" ss -Hltn "sport = :$IPERF_PORT") ]] || die "iperf3 server not listening after 10 s"

sleep 1 # let the handshakes' and registrations' work settle before idle RSS
for sys in "${SYSTEMS[@]}"; do record_rss "$sys" idle; done

for ((rep = 1; rep <= REPS; rep++)); do
    for sys in "${SYSTEMS[@]}"; do
        log "rep $rep/$REPS: ${SYSTEM_LABEL[$sys]}"
        run_ping "$sys"
        run_iperf "$sys" fwd 1 "$rep"
        run_iperf "$sys" rev 1 "$rep"
        run_iperf "$sys" fwd "$PARALLEL" "$rep"
        run_iperf "$sys" rev "$PARALLEL" "$rep"
    done
done
for sys in "${SYSTEMS[@]}"; do record_rss "$sys" after; done
for name in "${!PID_OF[@]}"; do
    running "${PID_OF[$name]}" || die "$name exited during the runs"
done

# --- Report --------------------------------------------------------------------
cpu_model=$(awk -F: '/^model name/ { sub(/^[ \t]+/, "", $2); print $2; exit }' /proc/cpuinfo)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $commit != unknown && -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    commit="$commit (+ uncommitted changes)"
fi
# Binaries older than a source file do not measure this commit: say so.
newer_src=""
if has_system tern; then
    newer_src=$(find "$REPO" -path "$REPO/target" -prune -o -path "$REPO/.git" -prune -o \
        \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -newer "$TERN" -print -quit 2>/dev/null || true)
fi
if [[ -n $newer_src ]]; then
    log "warning: ${newer_src#"$REPO"/} is newer than $TERN: rebuild (cargo build --release --workspace) to measure the current sources"
    commit="$commit, binaries older than the sources"
fi
sysctl_of() { cat "/proc/sys/net/core/$1" 2>/dev/null || echo ?; }
bufs="net.core.rmem_max $(sysctl_of rmem_max), wmem_max $(sysctl_of wmem_max), rmem_default $(sysctl_of rmem_default), wmem_default $(sysctl_of wmem_default)"
cmd="bash netns-tests/bench.sh"
for arg in "${ORIG_ARGS[@]}"; do
    if [[ $arg =~ ^[A-Za-z0-9_./=,:+-]+$ ]]; then cmd+=" $arg"; else cmd+=" $(printf '%q' "$arg")"; fi
done
[[ -n ${BORINGTUN_BIN:-} ]] && cmd="BORINGTUN_BIN=$(printf '%q' "$BORINGTUN_BIN") $cmd"
[[ -n ${TERN_BIN_DIR:-} ]] && cmd="TERN_BIN_DIR=$(printf '%q' "$TERN_BIN_DIR") $cmd"

labels=()
for sys in "${SYSTEMS[@]}"; do
    ifs=""
    for spec in $(system_"$sys"_ifaces); do ifs+="${ifs:+, }${spec#*:} in ${spec%%:*}"; done
    labels+=("$sys=${SYSTEM_LABEL[$sys]}|$ifs|$(system_"$sys"_version)")
done
SECTION=$WORKDIR/section.md
python3 - "$RESULTS" "$SECTION" "$REPS" "$RUN_SECS" "$PINGS" \
    "$(nproc)" "$cpu_model" "$(uname -r)" "$(date -u '+%Y-%m-%d %H:%M UTC')" "$cmd" "$commit" "$bufs" \
    "$PARALLEL" "$TUN_MTU" "${labels[@]}" <<'PY'
import statistics, sys
(results, out, reps, secs, pings, nproc, cpu, kernel, date, cmd, commit, bufs, par, mtu), labels = sys.argv[1:15], sys.argv[15:]
systems, label, iface_of, version = [], {}, {}, {}
for l in labels:
    name, rest = l.split("=", 1)
    systems.append(name)
    label[name], iface_of[name], version[name] = rest.split("|", 2)
values = {}
for line in open(results):
    sysname, key, value = line.rstrip("\n").split("\t")
    values.setdefault((sysname, key), []).append(float(value))

# Ratios are about tern: tern/raw, then tern/peer for each peer. Without
# tern, each system against raw.
if "tern" in systems:
    ratios = [("tern", s) for s in systems if s != "tern"]
elif "raw" in systems:
    ratios = [(s, "raw") for s in systems if s != "raw"]
else:
    ratios = []

def num(v):
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.2g}"

A, B = "a→b", "b→a"
P = f"{par} streams"
rows = [
    ("tput_fwd", f"TCP throughput {A}, 1 stream (Gbit/s)", 1),
    ("tput_rev", f"TCP throughput {B}, 1 stream, iperf3 -R (Gbit/s)", 1),
    (f"tput_fwd{par}", f"TCP throughput {A}, {P}, iperf3 -P {par} (Gbit/s)", 1),
    (f"tput_rev{par}", f"TCP throughput {B}, {P}, iperf3 -P {par} -R (Gbit/s)", 1),
    ("retr_fwd", f"TCP retransmits {A}, 1 stream (per run)", 1),
    ("retr_rev", f"TCP retransmits {B}, 1 stream (per run)", 1),
    (f"retr_fwd{par}", f"TCP retransmits {A}, {P} (per run)", 1),
    (f"retr_rev{par}", f"TCP retransmits {B}, {P} (per run)", 1),
    ("rtt_min", "ping RTT min (ms)", 1),
    ("rtt_p50", "ping RTT p50 (ms)", 1),
    ("rtt_avg", "ping RTT avg (ms)", 1),
    ("rtt_p99", "ping RTT p99 (ms)", 1),
    ("rtt_max", "ping RTT max (ms)", 1),
    ("ping_loss", "ping loss (%)", 1),
    ("cpu_s_fwd", f"daemons' CPU during {A} run, 1 stream (s, a+b)", 1),
    ("cpu_s_rev", f"daemons' CPU during {B} run, 1 stream (s, a+b)", 1),
    ("cpu_pct_a_fwd", f"node a daemon CPU, {A}, 1 stream (% of one core)", 1),
    ("cpu_pct_b_fwd", f"node b daemon CPU, {A}, 1 stream (% of one core)", 1),
    ("cpu_pct_a_rev", f"node a daemon CPU, {B}, 1 stream (% of one core)", 1),
    ("cpu_pct_b_rev", f"node b daemon CPU, {B}, 1 stream (% of one core)", 1),
    ("cpu_per_gb_fwd", f"daemons' CPU per GB, {A}, 1 stream (s/GB)", 1),
    ("cpu_per_gb_rev", f"daemons' CPU per GB, {B}, 1 stream (s/GB)", 1),
    (f"cpu_per_gb_fwd{par}", f"daemons' CPU per GB, {A}, {P} (s/GB)", 1),
    (f"cpu_per_gb_rev{par}", f"daemons' CPU per GB, {B}, {P} (s/GB)", 1),
    ("machine_busy_pct_fwd", f"whole machine busy during {A} run, 1 stream (% of all cores)", 1),
    ("machine_busy_pct_rev", f"whole machine busy during {B} run, 1 stream (% of all cores)", 1),
    (f"machine_busy_pct_fwd{par}", f"whole machine busy during {A} run, {P} (% of all cores)", 1),
    (f"machine_busy_pct_rev{par}", f"whole machine busy during {B} run, {P} (% of all cores)", 1),
    ("machine_cpu_per_gb_fwd", f"whole machine busy CPU per GB, {A}, 1 stream (s/GB)", 1),
    ("machine_cpu_per_gb_rev", f"whole machine busy CPU per GB, {B}, 1 stream (s/GB)", 1),
    (f"machine_cpu_per_gb_fwd{par}", f"whole machine busy CPU per GB, {A}, {P} (s/GB)", 1),
    (f"machine_cpu_per_gb_rev{par}", f"whole machine busy CPU per GB, {B}, {P} (s/GB)", 1),
    ("udp_rcvbuf_fwd", f"UDP RcvbufErrors in a+b during {A} run, 1 stream", 1),
    ("udp_rcvbuf_rev", f"UDP RcvbufErrors in a+b during {B} run, 1 stream", 1),
    (f"udp_rcvbuf_fwd{par}", f"UDP RcvbufErrors in a+b during {A} run, {P}", 1),
    (f"udp_rcvbuf_rev{par}", f"UDP RcvbufErrors in a+b during {B} run, {P}", 1),
    ("if_drops_fwd", f"interface drops in a+b during {A} run, 1 stream (tx+rx dropped)", 1),
    ("if_drops_rev", f"interface drops in a+b during {B} run, 1 stream (tx+rx dropped)", 1),
    (f"if_drops_fwd{par}", f"interface drops in a+b during {A} run, {P} (tx+rx dropped)", 1),
    (f"if_drops_rev{par}", f"interface drops in a+b during {B} run, {P} (tx+rx dropped)", 1),
    ("rss_a_idle", "node a daemon RSS, idle (MiB)", 1 / 1024),
    ("rss_b_idle", "node b daemon RSS, idle (MiB)", 1 / 1024),
    ("rss_a_after", "node a daemon RSS, after the runs (MiB)", 1 / 1024),
    ("rss_b_after", "node b daemon RSS, after the runs (MiB)", 1 / 1024),
]

def cell(vs):
    if not vs:
        return "—"
    med = statistics.median(vs)
    if len(vs) == 1 or min(vs) == max(vs):
        return num(med)
    return f"{num(med)} ({num(min(vs))}–{num(max(vs))})"

head = ["metric"] + [label[s] for s in systems] + [f"{label[x]}/{label[y]}" for x, y in ratios]
lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
for key, name, scale in rows:
    per = {s: [v * scale for v in values.get((s, key), [])] for s in systems}
    if not any(per.values()):
        continue
    row = [name] + [cell(per[s]) for s in systems]
    for x, y in ratios:
        if per[x] and per[y] and statistics.median(per[y]) != 0:
            row.append(num(statistics.median(per[x]) / statistics.median(per[y])) + "×")
        else:
            row.append("—")
    lines.append("| " + " | ".join(row) + " |")

rep_word = "repetition" if reps == "1" else "repetitions"
ifaces = "; ".join(f"{label[s]}: {ifs}" for s, ifs in iface_of.items())
tunnels = [s for s in systems if s != "raw"]
title = ", ".join(label[s] for s in tunnels) or label[systems[0]]
if "raw" in systems and tunnels:
    title += f" vs {label['raw']}"
peers_note = ""
if any(s not in ("raw", "tern") for s in systems):
    versions = ", ".join(version[s] or label[s] for s in tunnels)
    peers_note = (f"\nTunnels: {versions}; all at MTU {mtu}, the peers' other settings at their defaults (nebula:"
                  " lighthouse in tb-lh, UDP socket buffers 4 MiB like tern's; wireguard-go and boringtun: one"
                  " point-to-point pair, configured with `wg`, which have no buffer setting and get the kernel's"
                  " rmem_default/wmem_default).")
text = f"""## Core data path: {title}

Machine: {nproc} × {cpu}, kernel {kernel}, {bufs}; {date}; tern {commit}.
Command: `{cmd}` ({reps} {rep_word} interleaved, {secs} s per iperf3 run, {pings} pings per RTT figure).

""" + "\n".join(lines) + f"""

Cells are medians over the repetitions with (min–max); ratios are medians over medians, from the same run.
RSS rows are single samples. "Daemons" are the tunnel processes of nodes a and b (utime+stime from
/proc/<pid>/stat; not the lighthouses); "whole machine" is all busy CPU time in /proc/stat (iperf3, kernel
and daemons), per 10^9 bytes received. Interface drops count the system's interfaces in a and b ({ifaces}).
TCP with one stream and with {par} parallel streams (iperf3 -P {par}), a in tb-a (198.18.0.2), b in tb-b
(198.18.0.3), via a bridge in tb-wan.{peers_note}
"""
open(out, "w").write(text)
PY

cat "$SECTION"

if ((WRITE)); then
    python3 - "$REPO/BENCHMARKS.md" "$SECTION" <<'PY'
import os, sys
path, section = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
start, end = "<!-- bench:core:start -->", "<!-- bench:core:end -->"
block = f"{start}\n{section}\n{end}"
if os.path.exists(path):
    text = open(path).read()
else:
    text = "# Benchmarks\n\nGenerated by `netns-tests/bench.sh --write`.\n"
i, j = text.find(start), text.find(end)
if i != -1 and j > i:
    text = text[:i] + block + text[j + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
tmp = path + ".tmp"
open(tmp, "w").write(text)
os.replace(tmp, path)
PY
    log "wrote the section into $REPO/BENCHMARKS.md"
fi
