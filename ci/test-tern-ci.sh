#!/usr/bin/env bash
# Tests for ci/tern-ci.sh, without root and without a mesh: a fake `tern`
# (written into a temporary directory) records its arguments and environment
# and exits with the code a test chooses.
#
#   bash ci/test-tern-ci.sh              all tests
#   bash ci/test-tern-ci.sh test_down    only these
#
# Prints PASS/FAIL per test and a count; exits 1 if any failed. The end-to-end
# test with the real binaries is tests/tests/ci_script.rs.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=$HERE/tern-ci.sh
WORK=$(mktemp -d "${TMPDIR:-/tmp}/tern-ci-test.XXXXXX")

cleanup() {
    local p
    # Fake nodes a failed test may have left in the background: our own
    # children, stopped by the PID they recorded.
    for p in "$WORK"/*/fake/pid; do
        if [ -s "$p" ]; then kill "$(cat "$p")" 2>/dev/null || true; fi
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

TOKEN="tern1_s3cr3t-enrollment-token"
JWT="eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJwcm9qZWN0In0.c2VjcmV0LWp3dA"
PEM='-----BEGIN TERN CERTIFICATE-----
bmFtZT1yb290CmZha2UgY2EgZm9yIHRlc3Rz
-----END TERN CERTIFICATE-----'

# --- the fake tern --------------------------------------------------------------

write_fake() {
    cat >"$1" <<'FAKE'
#!/usr/bin/env bash
# Fake tern: records "$*" in $FAKE_DIR/calls and some environment in
# $FAKE_DIR/env.<subcommand>; never prints a secret.
d=${FAKE_DIR:?}
printf '%s\n' "$*" >>"$d/calls"
{
    printf 'TERN_OIDC_TOKEN=%s\n' "${TERN_OIDC_TOKEN-<unset>}"
    printf 'TERN_ENROLL_TOKEN=%s\n' "${TERN_ENROLL_TOKEN-<unset>}"
    printf 'ACTIONS_ID_TOKEN_REQUEST_URL=%s\n' "${ACTIONS_ID_TOKEN_REQUEST_URL-<unset>}"
} >"$d/env.${1:-none}"
case ${1:-} in
--version)
    echo "tern ${FAKE_VERSION:-0.1.0}"
    ;;
up)
    log="" wait_for="" prev=""
    for a in "$@"; do
        case $prev in
        --log-file) log=$a ;;
        --wait-for) wait_for=$a ;;
        esac
        prev=$a
    done
    line="fake node: starting${FAKE_LOG_EXTRA:+ $FAKE_LOG_EXTRA}"
    # With --wait-for the node logs into --log-file; in the background its
    # stdout is the log.
    if [ -n "$log" ]; then echo "$line" >>"$log"; else echo "$line"; fi
    code=${FAKE_UP_EXIT:-0}
    if [ "$code" != 0 ]; then
        echo "tern up: fake failure $code" >&2
        exit "$code"
    fi
    : >"$d/running"
    if [ -n "$wait_for" ]; then
        echo "ready: $wait_for answered through the mesh"
        exit 0
    fi
    echo $$ >"$d/pid"
    trap 'rm -f "$d/running" "$d/pid"; exit 0' TERM
    while :; do sleep 0.1; done
    ;;
status)
    if [ ! -e "$d/running" ]; then
        echo "error: no daemon" >&2
        exit 1
    fi
    cat <<JSON
{
  "lighthouses": [
    {
      "endpoint": "127.0.0.1:4242",
      "name": "lh1",
      "registered": ${FAKE_REGISTERED:-true}
    }
  ],
  "name": "ci-fake-7",
  "overlay_ip": "100.64.100.7"
}
JSON
    ;;
kubeconfig)
    if [ "${FAKE_KUBECONFIG_EXIT:-0}" != 0 ]; then
        echo "error: no node offers a service named \"$2\"" >&2
        exit "$FAKE_KUBECONFIG_EXIT"
    fi
    out="" prev=""
    for a in "$@"; do
        if [ "$prev" = --out ]; then out=$a; fi
        prev=$a
    done
    echo "fake kubeconfig for $2" >"$out"
    ;;
down)
    if [ "${FAKE_DOWN_EXIT:-0}" != 0 ]; then
        echo "error: no node answers" >&2
        exit "$FAKE_DOWN_EXIT"
    fi
    rm -f "$d/running"
    if [ -s "$d/pid" ]; then kill "$(cat "$d/pid")" 2>/dev/null; fi
    echo "the node left the mesh"
    ;;
*)
    echo "fake tern: unexpected $*" >&2
    exit 99
    ;;
esac
FAKE
    chmod 755 "$1"
}

# --- helpers --------------------------------------------------------------------

# A fresh case: its own directory, fake tern and state dir; the environment
# emptied of anything a CI system around these tests may have set.
setup() {
    T=$(mktemp -d "$WORK/${FUNCNAME[1]}.XXXXXX")
    mkdir -p "$T/fake" "$T/bin"
    write_fake "$T/bin/fake-tern"
    local v
    for v in $(compgen -e); do
        case $v in
        TERN_* | GITHUB_* | ACTIONS_* | RUNNER_* | FAKE_*) unset "$v" ;;
        esac
    done
    export FAKE_DIR=$T/fake
    export TERN_BIN=$T/bin/fake-tern
    export TERN_LIGHTHOUSE=127.0.0.1:4242
    export TERN_CA=$PEM
    export TERN_STATE_DIR=$T/state
    export TERN_TOKEN=$TOKEN
    export TERN_CI_ASSUME_UID=0
    S=$T/state
}

# Runs the script; RC, $T/out, $T/err.
ci() {
    RC=0
    bash "$SCRIPT" "$@" </dev/null >"$T/out" 2>"$T/err" || RC=$?
}

fail() {
    echo "    $*" >&2
    if [ -e "$T/err" ]; then
        echo "    --- stderr ---" >&2
        sed 's/^/    /' "$T/err" >&2
        echo "    --- stdout ---" >&2
        sed 's/^/    /' "$T/out" >&2
    fi
    exit 1
}

expect_rc() {
    [ "$RC" = "$1" ] || fail "exit code $RC, expected $1"
}

# has FILE TEXT: FILE contains TEXT (fixed string).
has() {
    grep -qF -- "$2" "$1" || fail "$1 lacks: $2"
}

hasnt() {
    if [ -e "$1" ] && grep -qF -- "$2" "$1"; then fail "$1 contains: $2"; fi
}

# The Nth call of the fake tern (1-based), or the first whose arguments
# start with the word given.
call() {
    case $1 in
    [0-9]*) sed -n "${1}p" "$FAKE_DIR/calls" ;;
    *) grep -m 1 "^$1 " "$FAKE_DIR/calls" || true ;;
    esac
}

# PID runs (and is not a zombie no one has reaped yet).
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

no_secrets() {
    local f s
    for f in "$T/out" "$T/err" "$@"; do
        for s in "$TOKEN" "$JWT"; do
            hasnt "$f" "$s"
        done
    done
}

# A directory of links to every command on PATH except the ones named: a PATH
# without sudo (or tern), with everything else.
path_without() {
    local dir=$WORK/path-without-$(IFS=-; echo "$*") d f name skip keep
    if [ ! -d "$dir" ]; then
        mkdir -p "$dir"
        local dirs=()
        IFS=: read -r -a dirs <<<"$PATH"
        # Later directories first, so that the first on PATH wins (ln -f).
        local i
        for ((i = ${#dirs[@]} - 1; i >= 0; i--)); do
            d=${dirs[i]}
            [ -d "$d" ] || continue
            keep=()
            for f in "$d"/*; do
                [ -x "$f" ] && [ ! -d "$f" ] || continue
                name=${f##*/}
                skip=""
                for s in "$@"; do
                    if [ "$name" = "$s" ]; then skip=1; fi
                done
                if [ -z "$skip" ]; then keep+=("$f"); fi
            done
            if [ "${#keep[@]}" -gt 0 ]; then ln -sf -t "$dir" -- "${keep[@]}"; fi
        done
    fi
    printf '%s' "$dir"
}

# --- tests ----------------------------------------------------------------------

test_token_wait_for() {
    setup
    export TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    [ "$(call 1)" = "up --config $S/node.toml --wait-for 198.19.0.10:5432 --wait-timeout 30s --log-file $S/tern.log" ] ||
        fail "up call: $(call 1)"
    [ "$(call 2)" = "status --config $S/node.toml --json" ] || fail "status call: $(call 2)"
    [ "$(stat -c %a "$S")" = 700 ] || fail "state dir mode $(stat -c %a "$S")"
    [ "$(cat "$S/ca.crt")" = "$PEM" ] || fail "ca.crt: $(cat "$S/ca.crt")"
    local want
    want=$(
        cat <<EOF
# Written by tern-ci.sh up; removed by tern-ci.sh down.
[pki]
ca = "ca.crt"

[listen]
addr = "0.0.0.0:0"

[[lighthouses]]
endpoint = "127.0.0.1:4242"

[api]
socket = "$S/api/tern.sock"
EOF
    )
    [ "$(cat "$S/node.toml")" = "$want" ] || fail "node.toml:"$'\n'"$(cat "$S/node.toml")"
    has "$T/out" "ready: 198.19.0.10:5432 answered"
    # The token reaches tern in its environment, never on its command line.
    has "$FAKE_DIR/env.up" "TERN_ENROLL_TOKEN=$TOKEN"
    no_secrets "$FAKE_DIR/calls"
    has "$T/err" "joined the mesh as ci-fake-7 (100.64.100.7); config $S/node.toml"
    no_secrets
}

test_oidc_audience() {
    setup
    unset TERN_TOKEN
    export TERN_OIDC_AUDIENCE=tern
    export ACTIONS_ID_TOKEN_REQUEST_URL="https://token.invalid/?x=1"
    export ACTIONS_ID_TOKEN_REQUEST_TOKEN=$JWT
    export TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    [ "$(call 1)" = "up --config $S/node.toml --enroll-oidc --oidc-audience tern --wait-for 198.19.0.10:5432 --wait-timeout 30s --log-file $S/tern.log" ] ||
        fail "up call: $(call 1)"
    has "$FAKE_DIR/env.up" "ACTIONS_ID_TOKEN_REQUEST_URL=https://token.invalid/?x=1"
    hasnt "$FAKE_DIR/calls" "--enroll-token"
    no_secrets "$FAKE_DIR/calls"
}

test_oidc_audience_needs_id_token_permission() {
    setup
    unset TERN_TOKEN
    export TERN_OIDC_AUDIENCE=tern GITHUB_ACTIONS=true
    ci up
    expect_rc 2
    has "$T/err" "id-token: write"
    has "$T/out" "::error title=tern-ci::"
    [ ! -e "$FAKE_DIR/calls" ] || fail "tern was called"
}

test_oidc_token_from_env() {
    setup
    unset TERN_TOKEN
    export TERN_OIDC_TOKEN=$JWT
    export TERN_OIDC_AUDIENCE=tern # as the GitLab template sets both: the token wins
    export TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    [ "$(call 1)" = "up --config $S/node.toml --enroll-oidc --wait-for 198.19.0.10:5432 --wait-timeout 30s --log-file $S/tern.log" ] ||
        fail "up call: $(call 1)"
    has "$FAKE_DIR/env.up" "TERN_OIDC_TOKEN=$JWT"
    no_secrets "$FAKE_DIR/calls"
}

test_missing_inputs() {
    setup
    unset TERN_LIGHTHOUSE
    ci up
    expect_rc 2
    has "$T/err" "TERN_LIGHTHOUSE is not set"

    setup
    unset TERN_CA
    ci up
    expect_rc 2
    has "$T/err" "TERN_CA is not set"

    setup
    unset TERN_TOKEN
    ci up
    expect_rc 2
    has "$T/err" "no identity: set TERN_TOKEN"

    setup
    export TERN_OIDC_TOKEN=$JWT
    ci up
    expect_rc 2
    has "$T/err" "both TERN_TOKEN and OIDC"
    no_secrets

    setup
    export TERN_OIDC_AUDIENCE=tern
    ci up
    expect_rc 2
    has "$T/err" "not both"

    setup
    export TERN_MODE=kernel
    ci up
    expect_rc 2
    has "$T/err" "TERN_MODE=kernel"

    setup
    export TERN_WAIT_TIMEOUT=soon
    ci up
    expect_rc 2
    has "$T/err" "TERN_WAIT_TIMEOUT=soon"

    setup
    export TERN_LIGHTHOUSE=127.0.0.1
    ci up
    expect_rc 2
    has "$T/err" "has no port"

    setup
    ci
    expect_rc 2
    has "$T/err" "usage: tern-ci.sh up|down"
    [ ! -e "$FAKE_DIR/calls" ] || fail "tern was called"
}

test_exit_codes() {
    local code text
    for code in 1 68 69 70 71 77 78 124; do
        case $code in
        1) text="tern-ci: tern up failed: bad config, identity or environment; check" ;;
        68) text="tern-ci: no path to 198.19.0.10:5432 through the mesh; check that a gateway routing it is up" ;;
        69) text="tern-ci: no lighthouse answered; check TERN_LIGHTHOUSE (127.0.0.1:4242)" ;;
        70) text="tern-ci: 198.19.0.10:5432 refused the connection; check that the service listens there" ;;
        71) text="tern-ci: the gateway (or peer) in front of 198.19.0.10:5432 denies this job by policy; check its [[firewall.inbound]] rules" ;;
        77) text="tern-ci: the lighthouse refused the enrollment; check that the token is not used up or expired" ;;
        78) text="tern-ci: tern found no OIDC ID token; on GitHub Actions give the job 'permissions: id-token: write'" ;;
        124) text="tern-ci: no answer from 198.19.0.10:5432 within 5s; check that the service is up" ;;
        esac
        setup
        export TERN_WAIT_FOR=198.19.0.10:5432 TERN_WAIT_TIMEOUT=5s FAKE_UP_EXIT=$code GITHUB_ACTIONS=true
        ci up
        expect_rc "$code"
        has "$T/err" "$text"
        has "$T/err" "tern up: fake failure $code"
        has "$T/err" "--- last 20 lines of the node log ($S/tern.log) ---"
        has "$T/err" "fake node: starting"
        has "$T/out" "::error title=tern-ci::${text#tern-ci: }"
        no_secrets
    done
}

test_secrets_in_tern_output_are_masked() {
    setup
    export TERN_WAIT_FOR=198.19.0.10:5432 FAKE_UP_EXIT=77 FAKE_LOG_EXTRA="token $TOKEN"
    ci up
    expect_rc 77
    has "$T/err" "fake node: starting token ***"
    no_secrets
    # Never xtrace (it would print the token): no `set -x`, `set -o xtrace`.
    ! grep -qE '^[^#]*set[[:space:]]+(-[a-zA-Z]*x|-o[[:space:]]+xtrace)' "$SCRIPT" ||
        fail "the script enables xtrace"
}

test_kubeconfig() {
    setup
    export TERN_KUBECONFIG=k8s GITHUB_ENV=$T/github_env GITHUB_OUTPUT=$T/github_output
    ci up
    expect_rc 0
    has "$T/github_env" "KUBECONFIG=$S/kubeconfig"
    has "$T/github_output" "kubeconfig=$S/kubeconfig"
    has "$S/kubeconfig" "fake kubeconfig for k8s"
    has "$FAKE_DIR/calls" "kubeconfig k8s --config $S/node.toml --out $S/kubeconfig"

    setup
    export TERN_KUBECONFIG=nope FAKE_KUBECONFIG_EXIT=1
    ci up
    expect_rc 1
    has "$T/err" 'no node offers a service named "nope"'
    has "$T/err" "tern services"
}

test_lighthouse_names() {
    setup
    export TERN_LIGHTHOUSE="localhost:4242, 127.0.0.2:5000,localhost:4242" TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    has "$S/node.toml" 'endpoint = "127.0.0.1:4242"'
    has "$S/node.toml" 'endpoint = "127.0.0.2:5000"'
    [ "$(grep -c '^\[\[lighthouses\]\]' "$S/node.toml")" = 2 ] || fail "duplicates kept: $(cat "$S/node.toml")"

    setup
    export TERN_LIGHTHOUSE="127.0.0.1:4242,127.0.0.2:5000" TERN_LIGHTHOUSE_TCP="lh.example.com:443" TERN_TRANSPORT=auto
    ci up
    expect_rc 0
    has "$S/node.toml" 'tcp = "lh.example.com:443"'
    has "$S/node.toml" 'transport = "auto"'
    [ "$(grep -c '^tcp = ' "$S/node.toml")" = 1 ] || fail "tcp for the first lighthouse only: $(cat "$S/node.toml")"
    unset TERN_LIGHTHOUSE_TCP TERN_TRANSPORT

    setup
    export TERN_LIGHTHOUSE="127.0.0.1:4242" TERN_TRANSPORT=tcp
    ci up
    expect_rc 2
    has "$T/err" 'TERN_TRANSPORT=tcp needs TERN_LIGHTHOUSE_TCP'
    unset TERN_TRANSPORT

    setup
    export TERN_LIGHTHOUSE="no-such-lighthouse.invalid:4242"
    ci up
    expect_rc 69
    has "$T/err" 'the lighthouse name "no-such-lighthouse.invalid" (TERN_LIGHTHOUSE) does not resolve'
    [ ! -e "$FAKE_DIR/calls" ] || fail "tern was called"

    setup
    export TERN_LIGHTHOUSE="127.0.0.1:99999"
    ci up
    expect_rc 2
    has "$T/err" "the port must be 1 to 65535"
}

test_ca_from_path() {
    setup
    printf '%s\n' "$PEM" >"$T/mesh-ca.crt"
    export TERN_CA=$T/mesh-ca.crt TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    cmp -s "$T/mesh-ca.crt" "$S/ca.crt" || fail "ca.crt differs"

    setup
    export TERN_CA=$T/missing.crt
    ci up
    expect_rc 2
    has "$T/err" "TERN_CA is neither PEM text"
}

test_down() {
    setup
    export TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    export FAKE_DOWN_EXIT=1
    ci down
    expect_rc 0
    [ "$(tail -n 1 "$FAKE_DIR/calls")" = "down --config $S/node.toml" ] || fail "down call: $(tail -n 1 "$FAKE_DIR/calls")"
    has "$T/err" "tern down exited with 1"
    has "$T/err" "removed $S"
    [ ! -e "$S" ] || fail "state dir still there"

    # Nothing there: still exit 0, saying so.
    ci down
    expect_rc 0
    has "$T/err" "no state directory $S: no node to stop"

    # A directory that tern-ci did not make is neither used nor removed.
    setup
    mkdir -p "$S"
    echo keep >"$S/precious"
    ci up
    expect_rc 2
    has "$T/err" "was not made by tern-ci"
    ci down
    expect_rc 0
    [ -e "$S/precious" ] || fail "down removed a foreign directory"
}

test_background_without_wait_for() {
    setup
    export TERN_WAIT_TIMEOUT=10s
    ci up
    expect_rc 0
    [ "$(call up)" = "up --config $S/node.toml" ] || fail "up call: $(call up)"
    has "$T/err" "joined the mesh as ci-fake-7 (100.64.100.7)"
    local pid
    pid=$(cat "$S/tern.pid")
    alive "$pid" || fail "the node is not running in the background"
    has "$S/tern.log" "fake node: starting"
    ci down
    expect_rc 0
    has "$T/err" "the node left the mesh"
    local i
    for i in $(seq 1 30); do
        if ! alive "$pid"; then break; fi
        sleep 0.1
    done
    ! alive "$pid" || fail "the node still runs after down"
    [ ! -e "$S" ] || fail "state dir still there"

    # `tern down` fails but the node it started still runs: SIGTERM to it.
    setup
    export TERN_WAIT_TIMEOUT=10s
    ci up
    expect_rc 0
    pid=$(cat "$S/tern.pid")
    FAKE_DOWN_EXIT=1 ci down
    expect_rc 0
    has "$T/err" "tern down exited with 1"
    has "$T/err" "the node (pid $pid) still runs: sending it SIGTERM"
    ! alive "$pid" || fail "the node still runs after down"
    [ ! -e "$S" ] || fail "state dir still there"

    # The node never registers: 69 once TERN_WAIT_TIMEOUT is over, and it is
    # stopped.
    setup
    export TERN_WAIT_TIMEOUT=1s FAKE_REGISTERED=false
    ci up
    expect_rc 69
    has "$T/err" "no lighthouse registered the node within 1s"
    has "$T/err" "tern-ci: no lighthouse answered; check TERN_LIGHTHOUSE (127.0.0.1:4242)"
    has "$FAKE_DIR/calls" "down --config $S/node.toml"
    pid=$(grep -m 1 '' "$S/tern.pid")
    ! alive "$pid" || fail "the node still runs after the timeout"

    # The node stops before it registers: its code, explained.
    setup
    export FAKE_UP_EXIT=77
    ci up
    expect_rc 77
    has "$T/err" "the node stopped before it was registered"
    has "$T/err" "tern-ci: the lighthouse refused the enrollment"
    has "$T/err" "tern up: fake failure 77"
    no_secrets
}

test_github_outputs() {
    setup
    export TERN_WAIT_FOR=198.19.0.10:5432 GITHUB_ACTIONS=true
    export GITHUB_OUTPUT=$T/github_output GITHUB_ENV=$T/github_env
    ci up
    expect_rc 0
    has "$GITHUB_OUTPUT" "config=$S/node.toml"
    has "$GITHUB_OUTPUT" "name=ci-fake-7"
    has "$GITHUB_OUTPUT" "overlay-ip=100.64.100.7"
    has "$GITHUB_ENV" "TERN_CONFIG=$S/node.toml"
    hasnt "$T/out" "::error"
    no_secrets "$GITHUB_OUTPUT" "$GITHUB_ENV"
}

test_userspace_and_tun_modes() {
    setup
    export TERN_MODE=userspace TERN_WAIT_FOR=198.19.0.10:5432 TERN_CI_ASSUME_UID=1000
    export TERN_FORWARDS="127.0.0.1:15432=198.19.0.10:5432" TERN_ROUTES="198.19.0.0/24"
    local sys
    sys=$(path_without sudo tern)
    PATH=$sys ci up
    expect_rc 0
    [ "$(call 1)" = "up --config $S/node.toml --userspace --wait-for 198.19.0.10:5432 --wait-timeout 30s --log-file $S/tern.log" ] ||
        fail "up call: $(call 1)"
    has "$S/node.toml" 'mode = "userspace"'
    has "$S/node.toml" 'listen = "127.0.0.1:15432"'
    has "$S/node.toml" 'target = "198.19.0.10:5432"'
    has "$S/node.toml" 'subnet = "198.19.0.0/24"'
    # Userspace: the node's default (never the system's resolver).
    hasnt "$S/node.toml" 'configure_system'

    # DNS: the node's default unless asked; true needs tun mode.
    setup
    export TERN_MODE=userspace TERN_DNS=true
    PATH=$sys ci up
    expect_rc 2
    has "$T/err" "TERN_DNS=true needs TERN_MODE=tun"
    setup
    export TERN_DNS=maybe
    ci up
    expect_rc 2
    has "$T/err" "TERN_DNS=maybe: use true or false"
    setup
    export TERN_DNS=false TERN_WAIT_FOR=198.19.0.10:5432
    ci up
    expect_rc 0
    has "$S/node.toml" 'configure_system = false'

    # tun mode as a user without sudo: refused before anything runs.
    setup
    export TERN_MODE=tun TERN_CI_ASSUME_UID=1000 TERN_WAIT_FOR=198.19.0.10:5432
    PATH=$sys ci up
    expect_rc 2
    has "$T/err" "TERN_MODE=tun needs root"
    has "$T/err" "TERN_MODE=userspace"
    [ ! -e "$FAKE_DIR/calls" ] || fail "tern was called"

    # tun mode as a user with sudo: tern runs under sudo -n -E, up and down.
    setup
    export TERN_CI_ASSUME_UID=1000 TERN_WAIT_FOR=198.19.0.10:5432
    cat >"$T/bin/sudo" <<'EOF'
#!/usr/bin/env bash
printf '%s\n' "$*" >>"$FAKE_DIR/sudo-calls"
while [ "${1:-}" = -n ] || [ "${1:-}" = -E ]; do shift; done
exec "$@"
EOF
    chmod 755 "$T/bin/sudo"
    PATH=$T/bin:$sys ci up
    expect_rc 0
    has "$FAKE_DIR/sudo-calls" "-n -E $TERN_BIN up --config $S/node.toml"
    hasnt "$FAKE_DIR/calls" "--userspace"
    has "$S/node.toml" "group = \"$(id -gn)\""
    hasnt "$S/node.toml" 'configure_system'
    PATH=$T/bin:$sys ci down
    expect_rc 0
    has "$FAKE_DIR/sudo-calls" "-n -E $TERN_BIN down --config $S/node.toml"
}

test_binary_on_path_and_download() {
    local sys arch
    sys=$(path_without sudo tern)
    arch=$(uname -m)

    # tern on PATH, of the wanted version.
    setup
    unset TERN_BIN
    cp "$T/bin/fake-tern" "$T/bin/tern"
    export TERN_VERSION=v0.1.0 TERN_WAIT_FOR=198.19.0.10:5432
    PATH=$T/bin:$sys ci up
    expect_rc 0
    [ "$(cat "$S/tern.bin")" = "$T/bin/tern" ] || fail "used $(cat "$S/tern.bin")"

    # Another version on PATH, nowhere to download from.
    setup
    unset TERN_BIN
    cp "$T/bin/fake-tern" "$T/bin/tern"
    export TERN_VERSION=9.9.9
    PATH=$T/bin:$sys ci up
    expect_rc 2
    has "$T/err" "no tern binary: set TERN_BIN"

    # TERN_DOWNLOAD_URL, {version} and {arch} replaced.
    setup
    unset TERN_BIN
    mkdir -p "$T/pkg/tern-1.2.3" "$T/srv"
    cp "$T/bin/fake-tern" "$T/pkg/tern-1.2.3/tern"
    tar -czf "$T/srv/tern-1.2.3-$arch.tar.gz" -C "$T/pkg" .
    (cd "$T/srv" && sha256sum "tern-1.2.3-$arch.tar.gz" >SHA256SUMS)
    export TERN_VERSION=1.2.3 TERN_WAIT_FOR=198.19.0.10:5432 GITHUB_PATH=$T/github_path
    export TERN_DOWNLOAD_URL="file://$T/srv/tern-{version}-{arch}.tar.gz"
    PATH=$sys ci up
    expect_rc 0
    [ "$(cat "$S/tern.bin")" = "$S/bin/tern" ] || fail "used $(cat "$S/tern.bin")"
    has "$FAKE_DIR/calls" "up --config $S/node.toml"
    has "$GITHUB_PATH" "$S/bin"

    # On GitHub Actions: the action's own repository's release.
    setup
    unset TERN_BIN
    local rel=$T/srv/acme/tern/releases/download/v1.2.3
    mkdir -p "$rel" "$T/pkg"
    cp "$T/bin/fake-tern" "$T/pkg/tern"
    tar -czf "$rel/tern-1.2.3-$arch-linux.tar.gz" -C "$T/pkg" tern
    (cd "$rel" && sha256sum "tern-1.2.3-$arch-linux.tar.gz" >SHA256SUMS)
    export TERN_VERSION=1.2.3 TERN_WAIT_FOR=198.19.0.10:5432 GITHUB_ACTIONS=true
    export GITHUB_SERVER_URL="file://$T/srv" GITHUB_ACTION_PATH=$T/actions/_actions/acme/tern/v1
    PATH=$sys ci up
    expect_rc 0
    has "$T/err" "downloading tern from file://$rel/tern-1.2.3-$arch-linux.tar.gz"
    has "$T/err" "verified tern-1.2.3-$arch-linux.tar.gz: sha256"
    [ "$(cat "$S/tern.bin")" = "$S/bin/tern" ] || fail "used $(cat "$S/tern.bin")"

    # A release that does not exist.
    setup
    unset TERN_BIN
    export TERN_VERSION=4.0.0 TERN_DOWNLOAD_URL="file://$T/none/tern-{version}.tar.gz"
    PATH=$sys ci up
    expect_rc 1
    has "$T/err" "downloading tern from file://$T/none/tern-4.0.0.tar.gz failed"
}

# The GitHub action's steps (ci/action/*.js), as the runner runs them: inputs
# as INPUT_* variables, main then post with the state main saved.
test_github_action_main_and_post() {
    setup
    command -v node >/dev/null || fail "node is not installed (the GitHub action's steps are JavaScript)"
    local action=$HERE/action
    unset TERN_LIGHTHOUSE TERN_CA TERN_TOKEN TERN_STATE_DIR
    export GITHUB_ACTIONS=true GITHUB_STATE=$T/state-file GITHUB_OUTPUT=$T/output
    : >"$GITHUB_STATE"
    export INPUT_LIGHTHOUSE=127.0.0.1:4242 INPUT_CA=$PEM INPUT_TOKEN=$TOKEN
    export INPUT_MODE=tun INPUT_COMMAND=up
    # Names with a hyphen cannot be exported by bash; env(1) passes them.
    step() {
        RC=0
        env "INPUT_WAIT-FOR=198.19.0.10:5432" "INPUT_WAIT-TIMEOUT=30s" "INPUT_STATE-DIR=$S" \
            node "$action/$1" </dev/null >"$T/out" 2>"$T/err" || RC=$?
    }
    step main.js
    expect_rc 0
    [ "$(call 1)" = "up --config $S/node.toml --wait-for 198.19.0.10:5432 --wait-timeout 30s --log-file $S/tern.log" ] ||
        fail "up call: $(call 1)"
    has "$GITHUB_STATE" "tern_up=true"
    has "$GITHUB_OUTPUT" "config=$S/node.toml"
    no_secrets
    # The post step, with the state main saved: down, and the directory goes.
    STATE_tern_up=true step post.js
    expect_rc 0
    [ "$(tail -n 1 "$FAKE_DIR/calls")" = "down --config $S/node.toml" ] || fail "post call: $(tail -n 1 "$FAKE_DIR/calls")"
    [ ! -e "$S" ] || fail "state dir still there after the post step"
    # A `command: down` step saves nothing, so its post step does nothing.
    : >"$GITHUB_STATE"
    export INPUT_COMMAND=down
    step main.js
    expect_rc 0
    hasnt "$GITHUB_STATE" "tern_up"
    local calls
    calls=$(wc -l <"$FAKE_DIR/calls")
    step post.js
    [ "$(wc -l <"$FAKE_DIR/calls")" = "$calls" ] || fail "post ran tern without an up"
    # A failing up passes its code through, and the post step still cleans up.
    : >"$GITHUB_STATE"
    export INPUT_COMMAND=up FAKE_UP_EXIT=77
    step main.js
    expect_rc 77
    has "$GITHUB_STATE" "tern_up=true"
    has "$T/out" "::error title=tern-ci::"
    STATE_tern_up=true step post.js
    [ ! -e "$S" ] || fail "state dir left after a failed up"
    # An unknown command is refused.
    export INPUT_COMMAND=sideways
    step main.js
    expect_rc 2
}

test_syntax() {
    setup
    bash -n "$SCRIPT" || fail "bash -n $SCRIPT"
    bash -n "${BASH_SOURCE[0]}" || fail "bash -n ${BASH_SOURCE[0]}"
}

# --- runner ---------------------------------------------------------------------

ALL=$(compgen -A function test_)
if [ "$#" -gt 0 ]; then ALL=$*; fi
passed=0
failed=()
for t in $ALL; do
    # Not in a condition, so that set -e holds inside the test.
    set +e
    (
        set -euo pipefail
        "$t"
    ) >"$WORK/$t.log" 2>&1
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then
        echo "PASS $t"
        passed=$((passed + 1))
    else
        echo "FAIL $t"
        sed 's/^/  /' "$WORK/$t.log"
        failed+=("$t")
    fi
done
echo "tern-ci tests: $passed passed, ${#failed[@]} failed"
if [ "${#failed[@]}" -gt 0 ]; then
    exit 1
fi
