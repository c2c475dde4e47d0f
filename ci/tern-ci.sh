#!/usr/bin/env bash
# tern-ci.sh: join a CI job to a Tern mesh, and leave it again.
#
# Shared by the GitHub action (action.yml at the repository root)
# and the GitLab CI template (ci/gitlab-ci.yml); runs in any shell job too.
#
#   ci/tern-ci.sh up     write a node config, enroll, start the node in the
#                        background; return once it is ready (see TERN_WAIT_FOR)
#   ci/tern-ci.sh down   the node leaves the mesh (`tern down`); the state
#                        directory is removed. Always exits 0: it is a cleanup
#                        step and must not fail the job.
#   ci/tern-ci.sh install  only find or download (and verify) tern, as `up`
#                        does, and print its path; for jobs that only run
#                        `tern run` or `tern cert`. Exit codes 0, 1, 2, 66.
#
# Inputs (environment variables; empty means unset):
#   TERN_LIGHTHOUSE     required: HOST:PORT of the lighthouse(s), comma-separated.
#                       Names are resolved here (getent ahostsv4, first IPv4
#                       address): the node's config takes IP:PORT only.
#   TERN_LIGHTHOUSE_TCP optional: HOST:PORT of each lighthouse's TCP listener
#                       ([listen] tcp), comma-separated in TERN_LIGHTHOUSE's
#                       order, for runners whose network drops UDP (tern
#                       resolves these names itself; through HTTPS_PROXY,
#                       which tern up inherits, the proxy does).
#   TERN_TRANSPORT      "auto" (default: UDP, TCP while UDP gets no answer),
#                       "udp" or "tcp" ([[lighthouses]] transport).
#   TERN_KUBECONFIG     optional: a `[[services]] kind = "kubernetes"` service
#                       name. Once the node is up, `tern kubeconfig` writes
#                       $TERN_STATE_DIR/kubeconfig (mode 0600, no credential
#                       in it), exported as KUBECONFIG to later steps (and
#                       the `kubeconfig` output). Tun mode.
#   TERN_CA             required: the CA certificate, as PEM text (starting
#                       with -----BEGIN) or the path of a file.
#   Identity, exactly one of:
#   TERN_TOKEN          a one-time enrollment token (`tern-lighthouse token
#                       create`): handed to `tern up` as TERN_ENROLL_TOKEN,
#                       in its environment (never on a command line).
#   TERN_OIDC_AUDIENCE  OIDC on GitHub Actions: `tern up --enroll-oidc
#                       --oidc-audience AUD`; tern fetches the job's ID token
#                       itself (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN, which the
#                       job has with `permissions: id-token: write`).
#   TERN_OIDC_TOKEN     OIDC with the ID token in this variable (GitLab
#                       `id_tokens`): `tern up --enroll-oidc`; tern reads the
#                       variable itself, it is never put on a command line.
#                       When set, it wins over TERN_OIDC_AUDIENCE.
#   TERN_WAIT_FOR       optional HOST:PORT (an IPv4 address, or a name the node
#                       resolves: NAME.tern, db.internal): return only once a TCP connection
#                       to it through the mesh succeeded (`tern up --wait-for`).
#                       Without it: return once the node is registered with a
#                       lighthouse.
#   TERN_WAIT_TIMEOUT   how long that may take (default 30s; units ms s m h).
#   TERN_MODE           "tun" (default; a TUN device, needs root: `sudo -n -E`
#                       is used when not root) or "userspace" (no root; reach
#                       the mesh through TERN_FORWARDS or a [proxy]).
#   TERN_ROUTES         optional subnets to route through gateways,
#                       comma-separated (tun mode: `[[routes]]`).
#   TERN_DNS            "true" or "false" (`[dns] configure_system`); empty:
#                       the node's default, which in tun mode (the node runs
#                       as root) points the job's resolver at the node, so
#                       later steps resolve mesh names (NAME.tern) and names
#                       under gateways' zones (db.internal) with no further
#                       setup; every other name goes to the job's resolvers
#                       as before, and the resolver is put back by `down`.
#                       "true" makes a failure to do so fatal; "false" leaves
#                       the resolver alone. In userspace mode names resolve
#                       through the forwards and proxies only. (With TERN_DNS
#                       set, TERN_EXTRA_CONFIG must not have a [dns] table.)
#   TERN_FORWARDS       optional LISTEN=TARGET pairs, comma-separated, e.g.
#                       127.0.0.1:15432=198.19.0.10:5432 (`[[forwards]]`).
#   TERN_EXTRA_CONFIG   optional TOML appended to the node config as is
#                       (e.g. "[proxy]\nsocks5 = \"127.0.0.1:1080\"").
#   TERN_LISTEN         the node's UDP address (default 0.0.0.0:0: any port).
#   TERN_BIN            the tern binary to use. Otherwise `tern` on PATH if its
#                       `tern --version` matches TERN_VERSION (or TERN_VERSION
#                       is empty); otherwise it is downloaded (needs curl, tar):
#   TERN_VERSION        the release to download, e.g. 0.1.0 (empty: the latest
#                       release on GitHub).
#   TERN_DOWNLOAD_URL   a URL template for the release archive (a .tar.gz
#                       holding `tern`); {version} and {arch} (uname -m) are
#                       replaced. Default on GitHub Actions:
#                       $GITHUB_SERVER_URL/<the action's repository>/releases/
#                       download/v{version}/tern-{version}-{arch}-linux.tar.gz
#                       (what ci/package.sh builds).
#   TERN_SHA256         optional: the archive's SHA-256 (64 hex digits), pinned.
#                       A download is always checked against the SHA256SUMS
#                       file beside it (TERN_SHA256SUMS_URL to name another
#                       URL) and, when this is set, against this too; with it
#                       set a missing SHA256SUMS is allowed. Any mismatch, an
#                       archive SHA256SUMS does not list, or no SHA256SUMS and
#                       no pin: exit 66, nothing unpacked.
#   TERN_STATE_DIR      default ${RUNNER_TEMP:-${TMPDIR:-/tmp}}/tern-ci; made
#                       mode 0700. Holds ca.crt, node.toml (the node's config),
#                       tern.log (the node's log), api/tern.sock (its API
#                       socket, in a directory the daemon makes)
#                       and what `down` needs. `down` uses the same variable.
#   TERN_CI_ASSUME_UID  for tests only: the user id to act as instead of
#                       `id -u` (the root check of tun mode).
#
# Exit codes of `up` (those of `tern up`, each explained in one line on stderr
# as "tern-ci: <meaning>; <what to check>", followed by the last 20 lines of
# the node's log): 0 ready; 1 bad config, identity or environment; 2 usage (a
# missing or contradictory input); 68 no path to TERN_WAIT_FOR; 69 no
# lighthouse answered; 70 the target refused; 71 denied by policy (the
# gateway's firewall); 66 the downloaded tern does not match its checksum
# (SHA256SUMS or TERN_SHA256; refused, nothing unpacked); 75 store
# unavailable (the lighthouse's database is
# down; nothing was spent, retry the step); 77 the enrollment was refused;
# 78 no OIDC ID token was found; 124 no answer in time. With GITHUB_ACTIONS=true an ::error:: annotation too.
#
# On success `up` prints the node's name and overlay address and, when the
# files are given, writes config=, name= and overlay-ip= to $GITHUB_OUTPUT,
# TERN_CONFIG= (the node config, for `tern status --config`, `tern forward`,
# `tern run`) to $GITHUB_ENV and, for a downloaded binary, its directory to
# $GITHUB_PATH.
#
# Secrets: neither the token nor the OIDC token is ever printed (whatever tern
# prints is shown with them replaced by ***); this script never enables
# xtrace. Both reach tern through its environment, never its command line.

set -euo pipefail

readonly TERN_CI_MARKER=".tern-ci"
STATE=${TERN_STATE_DIR:-${RUNNER_TEMP:-${TMPDIR:-/tmp}}/tern-ci}
CFG=$STATE/node.toml
LOG=$STATE/tern.log
# Its own directory, which the daemon makes (as root under sudo, shared with
# the job's group): a daemon refuses a socket directory another user owns.
SOCK=$STATE/api/tern.sock
TERN=""
SUDO=()

usage() {
    cat <<'EOF'
usage: tern-ci.sh up|down|install
  up       join the mesh (inputs from TERN_* variables; see this script's header)
  down     leave the mesh and remove the state directory (always exits 0)
  install  find or download (and verify) tern, print its path
EOF
}

# Replaces the secrets in stdin by ***.
redact() {
    local line mask='***'
    while IFS= read -r line || [ -n "$line" ]; do
        if [ -n "${TERN_TOKEN:-}" ]; then line=${line//"$TERN_TOKEN"/$mask}; fi
        if [ -n "${TERN_OIDC_TOKEN:-}" ]; then line=${line//"$TERN_OIDC_TOKEN"/$mask}; fi
        if [ -n "${ACTIONS_ID_TOKEN_REQUEST_TOKEN:-}" ]; then
            line=${line//"$ACTIONS_ID_TOKEN_REQUEST_TOKEN"/$mask}
        fi
        printf '%s\n' "$line"
    done
}

say() {
    printf 'tern-ci: %s\n' "$*" | redact >&2
}

# A GitHub Actions error annotation (workflow commands are read from stdout).
annotate() {
    if [ "${GITHUB_ACTIONS:-}" = true ]; then
        local msg=$1
        msg=${msg//'%'/'%25'}
        msg=${msg//$'\r'/'%0D'}
        msg=${msg//$'\n'/'%0A'}
        printf '::error title=tern-ci::%s\n' "$msg" | redact
    fi
}

# die CODE MESSAGE: one line on stderr, an annotation, exit CODE.
die() {
    local code=$1
    shift
    say "$*"
    annotate "$*"
    exit "$code"
}

# The meaning of a `tern up` exit code and what to check.
meaning() {
    local target=${TERN_WAIT_FOR:-the target}
    local timeout=${TERN_WAIT_TIMEOUT:-30s}
    case $1 in
    1) echo "tern up failed: bad config, identity or environment; check the error above (TERN_CA, TERN_MODE, the node log)" ;;
    2) echo "tern up was called wrongly (usage); check TERN_WAIT_FOR (HOST:PORT) and TERN_WAIT_TIMEOUT (e.g. 30s)" ;;
    68) echo "no path to $target through the mesh; check that a gateway routing it is up and that its certificate and [gateway] subnets carry that address" ;;
    69) echo "no lighthouse answered; check TERN_LIGHTHOUSE (${TERN_LIGHTHOUSE:-}) and that it is reachable over UDP from this runner" ;;
    70) echo "$target refused the connection; check that the service listens there and that the gateway's firewall lets this job's groups in" ;;
    71) echo "the gateway (or peer) in front of $target denies this job by policy; check its [[firewall.inbound]] rules and the groups the job's certificate gets" ;;
    75) echo "the lighthouse could not reach its store (store unavailable: its database is down); nothing was spent, so retry this step shortly; check the lighthouse's [store] database" ;;
    77) echo "the lighthouse refused the enrollment; check that the token is not used up or expired (or that the job's OIDC claims match an [enroll] rule) and that its groups are within the lighthouse's issuer" ;;
    78) echo "tern found no OIDC ID token; on GitHub Actions give the job 'permissions: id-token: write', on GitLab CI declare id_tokens TERN_OIDC_TOKEN" ;;
    124) echo "no answer from $target within $timeout; check that the service is up, that the gateway reaches it and that no firewall drops the traffic" ;;
    *) echo "tern up exited with $1; check the output above and the node log" ;;
    esac
}

# fail_up CODE: the meaning line, the annotation, the log's tail; exit CODE.
fail_up() {
    local code=$1 text
    text=$(meaning "$code")
    say "$text"
    annotate "$text"
    if [ -s "$LOG" ]; then
        printf -- '--- last 20 lines of the node log (%s) ---\n' "$LOG" >&2
        tail -n 20 "$LOG" | redact >&2
    fi
    exit "$code"
}

# A TOML basic string.
toml_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

trim() {
    local s=$1
    s=${s#"${s%%[![:space:]]*}"}
    s=${s%"${s##*[![:space:]]}"}
    printf '%s' "$s"
}

# Seconds (rounded up) in a duration like 30s, 500ms, 2m, 1h30m, or 45.
duration_secs() {
    local text=$1 rest total_ms=0 n unit
    if [[ $text =~ ^[0-9]+$ ]]; then
        echo "$text"
        return 0
    fi
    rest=$text
    while [ -n "$rest" ]; do
        if [[ $rest =~ ^([0-9]+)(ms|s|m|h|d)(.*)$ ]]; then
            n=${BASH_REMATCH[1]}
            unit=${BASH_REMATCH[2]}
            rest=${BASH_REMATCH[3]}
            n=$((10#$n))
            case $unit in
            ms) total_ms=$((total_ms + n)) ;;
            s) total_ms=$((total_ms + n * 1000)) ;;
            m) total_ms=$((total_ms + n * 60000)) ;;
            h) total_ms=$((total_ms + n * 3600000)) ;;
            d) total_ms=$((total_ms + n * 86400000)) ;;
            esac
        else
            return 1
        fi
    done
    echo $(((total_ms + 999) / 1000))
}

# One lighthouse HOST:PORT as IP:PORT, in RESOLVED (not printed: die must
# reach the caller's stdout for its annotation).
RESOLVED=""
resolve_endpoint() {
    local entry=$1 host port ip out
    case $entry in
    \[*\]:*)
        host=${entry%]:*}
        host=${host#[}
        port=${entry##*]:}
        ;;
    *:*)
        host=${entry%:*}
        port=${entry##*:}
        ;;
    *) die 2 "TERN_LIGHTHOUSE: \"$entry\" has no port; give HOST:PORT, e.g. 192.0.2.10:4242" ;;
    esac
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$((10#$port))" -lt 1 ] || [ "$((10#$port))" -gt 65535 ]; then
        die 2 "TERN_LIGHTHOUSE: \"$entry\": the port must be 1 to 65535"
    fi
    port=$((10#$port))
    if [ -z "$host" ]; then
        die 2 "TERN_LIGHTHOUSE: \"$entry\" has no host; give HOST:PORT"
    fi
    if [[ $entry == \[* ]]; then
        RESOLVED="[$host]:$port"
        return 0
    fi
    if [[ $host =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        RESOLVED="$host:$port"
        return 0
    fi
    out=$(getent ahostsv4 "$host" 2>/dev/null) || out=""
    ip=${out%%[[:space:]]*}
    if ! [[ $ip =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
        die 69 "the lighthouse name \"$host\" (TERN_LIGHTHOUSE) does not resolve to an IPv4 address; check the name and this runner's DNS"
    fi
    RESOLVED="$ip:$port"
}

# The owner/name of the action's repository on GitHub Actions.
action_repository() {
    if [ -n "${GITHUB_ACTION_REPOSITORY:-}" ]; then
        printf '%s' "$GITHUB_ACTION_REPOSITORY"
        return 0
    fi
    # Composite actions may see it empty: .../_actions/OWNER/REPO/REF.
    local p=${GITHUB_ACTION_PATH:-}
    p=${p%/}
    p=${p%/*}
    local repo=${p##*/}
    p=${p%/*}
    local owner=${p##*/}
    p=${p%/*}
    if [ "${p##*/}" = _actions ] && [ -n "$owner" ] && [ -n "$repo" ]; then
        printf '%s/%s' "$owner" "$repo"
    fi
}

# Sets TERN: TERN_BIN, a matching `tern` on PATH, or a download.
find_tern() {
    local want=${TERN_VERSION:-}
    want=${want#v}
    if [ -n "${TERN_BIN:-}" ]; then
        if [ ! -x "$TERN_BIN" ]; then
            die 2 "TERN_BIN=$TERN_BIN is not an executable file"
        fi
        TERN=$TERN_BIN
        return 0
    fi
    local onpath have
    if onpath=$(command -v tern 2>/dev/null); then
        have=$("$onpath" --version 2>/dev/null) || have=""
        have=${have##* }
        if [ -z "$want" ] || [ "$have" = "$want" ]; then
            TERN=$onpath
            return 0
        fi
        say "tern on PATH ($onpath) is version ${have:-unknown}, not $want: downloading $want"
    fi
    local url="" arch
    arch=$(uname -m)
    if [ -n "${TERN_DOWNLOAD_URL:-}" ]; then
        if [ -z "$want" ] && [[ $TERN_DOWNLOAD_URL == *"{version}"* ]]; then
            die 2 "TERN_DOWNLOAD_URL has {version} but TERN_VERSION is empty; set TERN_VERSION"
        fi
        url=${TERN_DOWNLOAD_URL//\{version\}/$want}
        url=${url//\{arch\}/$arch}
    elif [ "${GITHUB_ACTIONS:-}" = true ] && [ -n "${GITHUB_SERVER_URL:-}" ]; then
        local repo
        repo=$(action_repository)
        if [ -n "$repo" ]; then
            if [ -z "$want" ]; then
                want=$(latest_release "$GITHUB_SERVER_URL/$repo")
            fi
            url="$GITHUB_SERVER_URL/$repo/releases/download/v$want/tern-$want-$arch-linux.tar.gz"
        fi
    fi
    if [ -z "$url" ]; then
        die 2 "no tern binary: set TERN_BIN (a path), put tern on PATH, or set TERN_DOWNLOAD_URL (and TERN_VERSION)"
    fi
    need_download_tools
    local archive=$STATE/tern.tar.gz dir=$STATE/bin
    say "downloading tern from $url"
    if ! curl --fail --silent --show-error --location --retry 3 --output "$archive" "$url"; then
        die 1 "downloading tern from $url failed; check TERN_VERSION (a release with that archive must exist) or set TERN_BIN / TERN_DOWNLOAD_URL"
    fi
    verify_download "$archive" "$url"
    mkdir -p "$dir.x"
    if ! tar -xzf "$archive" -C "$dir.x"; then
        die 1 "$url is not a .tar.gz archive; check TERN_DOWNLOAD_URL"
    fi
    local found
    found=$(find "$dir.x" -type f -name tern | head -n 1)
    if [ -z "$found" ]; then
        die 1 "$url holds no file named tern; check TERN_DOWNLOAD_URL"
    fi
    mkdir -p "$dir"
    mv "$found" "$dir/tern"
    chmod 755 "$dir/tern"
    rm -rf "$dir.x" "$archive"
    TERN=$dir/tern
    if ! "$TERN" --version >/dev/null 2>&1; then
        die 1 "the downloaded $TERN does not run here (tern-$arch-linux); set TERN_BIN"
    fi
}

need_download_tools() {
    local tool
    for tool in curl tar sha256sum; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            die 2 "downloading tern needs curl, tar and sha256sum; install them, or set TERN_BIN"
        fi
    done
}

# The newest release's version, from where GitHub's releases/latest redirects
# (.../releases/tag/v1.2.3).
latest_release() {
    local base=$1 where
    need_download_tools
    if ! where=$(curl --fail --silent --show-error --location --retry 3 --head \
        --output /dev/null --write-out '%{url_effective}' "$base/releases/latest"); then
        die 1 "asking $base for its latest release failed; set TERN_VERSION"
    fi
    case $where in
    */releases/tag/v*) printf '%s' "${where##*/releases/tag/v}" ;;
    *) die 1 "$base has no release to download (releases/latest led to $where); set TERN_VERSION or TERN_BIN" ;;
    esac
}

# verify_download ARCHIVE URL: the archive's SHA-256 must be the one the
# release's SHA256SUMS (beside it, or TERN_SHA256SUMS_URL) lists for its name,
# and TERN_SHA256 when that is set. Exits 66 otherwise; nothing is unpacked.
verify_download() {
    local archive=$1 url=$2 name sums_url sums=$STATE/SHA256SUMS got listed="" pinned
    name=${url##*/}
    name=${name%%\?*}
    sums_url=${TERN_SHA256SUMS_URL:-${url%/*}/SHA256SUMS}
    got=$(sha256sum "$archive") || die 1 "sha256sum $archive failed"
    got=${got%% *}
    pinned=${TERN_SHA256:-}
    pinned=$(printf '%s' "$pinned" | tr 'A-F' 'a-f' | tr -d '[:space:]')
    if [ -n "$pinned" ] && ! [[ $pinned =~ ^[0-9a-f]{64}$ ]]; then
        rm -f "$archive"
        die 2 "TERN_SHA256 is not a SHA-256 (64 hex digits): ${TERN_SHA256:-}"
    fi
    if curl --fail --silent --show-error --location --retry 3 --output "$sums" "$sums_url" 2>"$STATE/sums.err"; then
        # Lines are "<sha256>  <name>" (a '*' before the name in binary mode).
        listed=$(awk -v n="$name" '{ f = $2; sub(/^\*/, "", f); if (f == n) { print tolower($1); exit } }' "$sums")
        rm -f "$sums" "$STATE/sums.err"
        if [ -z "$listed" ]; then
            rm -f "$archive"
            die 66 "$sums_url does not list $name: refusing to install an archive its release does not vouch for; check TERN_VERSION and TERN_DOWNLOAD_URL"
        fi
        if [ "$listed" != "$got" ]; then
            rm -f "$archive"
            die 66 "$name does not match its release's SHA256SUMS (listed $listed, downloaded $got): refusing it; the download was altered or the release is broken"
        fi
    elif [ -z "$pinned" ]; then
        rm -f "$archive"
        die 66 "no SHA256SUMS at $sums_url ($(tr -d '\n' <"$STATE/sums.err" 2>/dev/null)): cannot verify $name, refusing it; set TERN_SHA256 to the archive's SHA-256, or TERN_SHA256SUMS_URL"
    else
        rm -f "$STATE/sums.err"
        say "no SHA256SUMS at $sums_url; checking $name against TERN_SHA256 alone"
    fi
    if [ -n "$pinned" ] && [ "$pinned" != "$got" ]; then
        rm -f "$archive"
        die 66 "$name does not match TERN_SHA256 (pinned $pinned, downloaded $got): refusing it"
    fi
    say "verified $name: sha256 $got${pinned:+ (pinned)}${listed:+ (SHA256SUMS)}"
}

# Sets SUDO for tun mode when not root.
need_root() {
    local uid=${TERN_CI_ASSUME_UID:-}
    if [ -z "$uid" ]; then uid=$(id -u); fi
    if [ "$uid" = 0 ]; then return 0; fi
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n -E)
        return 0
    fi
    die 2 "TERN_MODE=tun needs root for its TUN device, and this job is not root and has no sudo; run as root, install sudo, or set TERN_MODE=userspace"
}

# The state directory: ours (the marker) or new, mode 0700.
make_state_dir() {
    if [ -e "$STATE" ] && [ ! -d "$STATE" ]; then
        die 2 "TERN_STATE_DIR=$STATE exists and is not a directory; point TERN_STATE_DIR at a new directory"
    fi
    if [ -d "$STATE" ] && [ ! -e "$STATE/$TERN_CI_MARKER" ] && [ -n "$(ls -A "$STATE")" ]; then
        die 2 "TERN_STATE_DIR=$STATE is not empty and was not made by tern-ci; point TERN_STATE_DIR at a new directory"
    fi
    # A node from an earlier `up` with this state directory, still running?
    local old=""
    if [ -s "$STATE/tern.bin" ]; then old=$(<"$STATE/tern.bin"); fi
    if [ -S "$SOCK" ] && [ -n "$old" ] && [ -x "$old" ] &&
        "${SUDO[@]+"${SUDO[@]}"}" "$old" status --socket "$SOCK" >/dev/null 2>&1; then
        die 2 "a node from an earlier 'up' still runs (API socket $SOCK); run 'tern-ci.sh down' first, or set another TERN_STATE_DIR"
    fi
    (umask 077 && mkdir -p "$STATE")
    chmod 700 "$STATE"
    : >"$STATE/$TERN_CI_MARKER"
    rm -f "$STATE/up.out" "$STATE/up.err" "$STATE/tern.pid" "$LOG"
}

# TERN (with sudo in tun mode when not root) and its arguments.
run_tern() {
    if [ "${#SUDO[@]}" -gt 0 ]; then
        "${SUDO[@]}" "$TERN" "$@"
    else
        "$TERN" "$@"
    fi
}

write_config() {
    local endpoints=("$@") ep entry listen=${TERN_LISTEN:-0.0.0.0:0}
    {
        echo "# Written by tern-ci.sh up; removed by tern-ci.sh down."
        echo "[pki]"
        echo 'ca = "ca.crt"'
        echo
        echo "[listen]"
        echo "addr = $(toml_str "$listen")"
        for entry in "${endpoints[@]}"; do
            ep=${entry%%|*}
            echo
            echo "[[lighthouses]]"
            echo "endpoint = $(toml_str "$ep")"
            if [ "$entry" != "$ep" ]; then
                echo "tcp = $(toml_str "${entry#*|}")"
            fi
            if [ -n "${TERN_TRANSPORT:-}" ]; then
                echo "transport = $(toml_str "$TERN_TRANSPORT")"
            fi
        done
        if [ "$MODE" = userspace ]; then
            echo
            echo "[tun]"
            echo 'mode = "userspace"'
        fi
        echo
        echo "[api]"
        echo "socket = $(toml_str "$SOCK")"
        if [ "${#SUDO[@]}" -gt 0 ]; then
            # The daemon runs as root; the job's own group may use its socket.
            echo "group = $(toml_str "$(id -gn)")"
        fi
        if [ -n "${TERN_ROUTES:-}" ]; then
            local routes
            IFS=',' read -r -a routes <<<"$TERN_ROUTES"
            for entry in "${routes[@]}"; do
                entry=$(trim "$entry")
                if [ -z "$entry" ]; then continue; fi
                echo
                echo "[[routes]]"
                echo "subnet = $(toml_str "$entry")"
            done
        fi
        if [ -n "${TERN_FORWARDS:-}" ]; then
            local forwards
            IFS=',' read -r -a forwards <<<"$TERN_FORWARDS"
            for entry in "${forwards[@]}"; do
                entry=$(trim "$entry")
                if [ -z "$entry" ]; then continue; fi
                if [[ $entry != *=* ]]; then
                    die 2 "TERN_FORWARDS: \"$entry\" is not LISTEN=TARGET, e.g. 127.0.0.1:15432=198.19.0.10:5432"
                fi
                echo
                echo "[[forwards]]"
                echo "listen = $(toml_str "${entry%%=*}")"
                echo "target = $(toml_str "${entry#*=}")"
            done
        fi
        if [ -n "$DNS" ]; then
            echo
            echo "[dns]"
            echo "configure_system = $DNS"
        fi
        if [ -n "${TERN_EXTRA_CONFIG:-}" ]; then
            echo
            printf '%s\n' "$TERN_EXTRA_CONFIG"
        fi
    } >"$CFG.tmp"
    mv "$CFG.tmp" "$CFG"
}

write_ca() {
    local ca
    ca=$(trim "$TERN_CA")
    if [[ $ca == -----BEGIN* ]]; then
        printf '%s\n' "$ca" >"$STATE/ca.crt"
    elif [ -f "$TERN_CA" ] && [ -r "$TERN_CA" ]; then
        cp "$TERN_CA" "$STATE/ca.crt"
    else
        die 2 "TERN_CA is neither PEM text (starting with -----BEGIN) nor a readable file"
    fi
    chmod 644 "$STATE/ca.crt"
}

# "key" of the top level of `tern status --json` (pretty, two-space indent).
json_top() {
    local key=$1 line value
    while IFS= read -r line; do
        if [[ $line =~ ^\ \ \"$key\":\ \"([^\"]*)\",?$ ]]; then
            value=${BASH_REMATCH[1]}
            printf '%s' "$value"
            return 0
        fi
    done
    return 0
}

append_github() {
    local file=$1 line=$2
    if [ -n "$file" ]; then
        printf '%s\n' "$line" >>"$file"
    fi
}

# Prints tern's captured output, secrets replaced.
show_output() {
    if [ -s "$STATE/up.out" ]; then redact <"$STATE/up.out"; fi
    if [ -s "$STATE/up.err" ]; then redact <"$STATE/up.err" >&2; fi
    rm -f "$STATE/up.out" "$STATE/up.err"
}

up() {
    if [ -z "${TERN_LIGHTHOUSE:-}" ]; then
        die 2 "TERN_LIGHTHOUSE is not set: give the lighthouse as HOST:PORT (several comma-separated)"
    fi
    if [ -z "${TERN_CA:-}" ]; then
        die 2 "TERN_CA is not set: give the mesh's CA certificate as PEM text or a file path"
    fi
    local oidc=""
    if [ -n "${TERN_OIDC_TOKEN:-}" ]; then
        oidc=env
    elif [ -n "${TERN_OIDC_AUDIENCE:-}" ]; then
        oidc=audience
    fi
    if [ -n "${TERN_TOKEN:-}" ] && [ -n "$oidc" ]; then
        die 2 "both TERN_TOKEN and OIDC (TERN_OIDC_AUDIENCE or TERN_OIDC_TOKEN) are set: use one identity, not both"
    fi
    if [ -z "${TERN_TOKEN:-}" ] && [ -z "$oidc" ]; then
        die 2 "no identity: set TERN_TOKEN (an enrollment token), or for OIDC TERN_OIDC_AUDIENCE (GitHub Actions) or TERN_OIDC_TOKEN (GitLab id_tokens)"
    fi
    if [ "$oidc" = audience ] &&
        { [ -z "${ACTIONS_ID_TOKEN_REQUEST_URL:-}" ] || [ -z "${ACTIONS_ID_TOKEN_REQUEST_TOKEN:-}" ]; }; then
        die 2 "TERN_OIDC_AUDIENCE needs GitHub Actions' ID token (ACTIONS_ID_TOKEN_REQUEST_URL and _TOKEN are not set): give the job 'permissions: id-token: write'; outside GitHub Actions set TERN_OIDC_TOKEN"
    fi
    MODE=${TERN_MODE:-tun}
    case $MODE in
    tun | userspace) ;;
    *) die 2 "TERN_MODE=$MODE: use tun or userspace" ;;
    esac
    DNS=${TERN_DNS:-}
    case $DNS in
    '' | true | false) ;;
    *) die 2 "TERN_DNS=$DNS: use true or false" ;;
    esac
    if [ "$DNS" = true ] && [ "$MODE" = userspace ]; then
        die 2 "TERN_DNS=true needs TERN_MODE=tun (a userspace node cannot be the system's resolver; its forwards and proxies resolve mesh names)"
    fi
    local timeout=${TERN_WAIT_TIMEOUT:-30s} timeout_secs
    if ! timeout_secs=$(duration_secs "$timeout"); then
        die 2 "TERN_WAIT_TIMEOUT=$timeout is not a duration; e.g. 30s, 2m, 1m30s"
    fi

    case ${TERN_TRANSPORT:-auto} in
    auto | udp | tcp) ;;
    *) die 2 "TERN_TRANSPORT=$TERN_TRANSPORT: give auto, udp or tcp" ;;
    esac
    local endpoints=() entries tcps entry ep seen i=0 tcp
    IFS=',' read -r -a entries <<<"$TERN_LIGHTHOUSE"
    IFS=',' read -r -a tcps <<<"${TERN_LIGHTHOUSE_TCP:-}"
    if [ "${#tcps[@]}" -gt "${#entries[@]}" ]; then
        die 2 "TERN_LIGHTHOUSE_TCP has more entries than TERN_LIGHTHOUSE; give one TCP listener per lighthouse, in the same order"
    fi
    for entry in "${entries[@]}"; do
        tcp=$(trim "${tcps[$i]:-}")
        i=$((i + 1))
        entry=$(trim "$entry")
        if [ -z "$entry" ]; then continue; fi
        resolve_endpoint "$entry"
        ep=$RESOLVED
        if [ -n "$tcp" ]; then
            if ! [[ $tcp =~ ^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]+$ ]]; then
                die 2 "TERN_LIGHTHOUSE_TCP: \"$tcp\" is not HOST:PORT, e.g. lighthouse.example.com:443"
            fi
            ep="$ep|$tcp"
        elif [ "${TERN_TRANSPORT:-}" = tcp ]; then
            die 2 "TERN_TRANSPORT=tcp needs TERN_LIGHTHOUSE_TCP for $entry"
        fi
        seen=""
        for e in "${endpoints[@]+"${endpoints[@]}"}"; do
            if [ "${e%%|*}" = "${ep%%|*}" ]; then seen=1; fi
        done
        if [ -z "$seen" ]; then endpoints+=("$ep"); fi
    done
    if [ "${#endpoints[@]}" -eq 0 ]; then
        die 2 "TERN_LIGHTHOUSE has no HOST:PORT in it"
    fi

    if [ "$MODE" = tun ]; then need_root; fi
    make_state_dir
    find_tern
    write_ca
    write_config "${endpoints[@]}"
    printf '%s\n' "$TERN" >"$STATE/tern.bin"
    if [ "${#SUDO[@]}" -gt 0 ]; then : >"$STATE/sudo"; else rm -f "$STATE/sudo"; fi

    local args=(up --config "$CFG")
    if [ "$MODE" = userspace ]; then args+=(--userspace); fi
    if [ -n "${TERN_TOKEN:-}" ]; then
        # In tern's environment, which only its user can read, not on its
        # command line, which ps shows everyone.
        export TERN_ENROLL_TOKEN=$TERN_TOKEN
    elif [ "$oidc" = env ]; then
        args+=(--enroll-oidc)
    else
        args+=(--enroll-oidc --oidc-audience "$TERN_OIDC_AUDIENCE")
    fi

    local rc=0
    if [ -n "${TERN_WAIT_FOR:-}" ]; then
        args+=(--wait-for "$TERN_WAIT_FOR" --wait-timeout "$timeout" --log-file "$LOG")
        say "joining the mesh (${endpoints[*]//|/ tcp }, $MODE mode), waiting up to $timeout for $TERN_WAIT_FOR"
        run_tern "${args[@]}" </dev/null >"$STATE/up.out" 2>"$STATE/up.err" || rc=$?
        show_output
        if [ "$rc" -ne 0 ]; then fail_up "$rc"; fi
    else
        say "joining the mesh (${endpoints[*]//|/ tcp }, $MODE mode), waiting up to $timeout for a lighthouse"
        local launch=()
        if command -v setsid >/dev/null 2>&1; then
            launch=(setsid)
        elif command -v nohup >/dev/null 2>&1; then
            launch=(nohup)
        fi
        # In the background, detached, its output in the log.
        "${launch[@]+"${launch[@]}"}" "${SUDO[@]+"${SUDO[@]}"}" "$TERN" "${args[@]}" </dev/null >>"$LOG" 2>&1 &
        local pid=$!
        printf '%s\n' "$pid" >"$STATE/tern.pid"
        local deadline=$((SECONDS + timeout_secs)) status
        while :; do
            if ! kill -0 "$pid" 2>/dev/null; then
                wait "$pid" || rc=$?
                if [ "$rc" -eq 0 ]; then rc=1; fi
                say "the node stopped before it was registered"
                fail_up "$rc"
            fi
            status=$(run_tern status --config "$CFG" --json 2>/dev/null) || status=""
            if [[ $status == *'"registered": true'* ]]; then break; fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                # Stop it: through its API if it has one (as root, under sudo,
                # a signal from us may not reach it), else by its PID.
                run_tern down --config "$CFG" </dev/null >/dev/null 2>&1 || true
                kill "$pid" 2>/dev/null || true
                wait "$pid" 2>/dev/null || true
                say "no lighthouse registered the node within $timeout"
                fail_up 69
            fi
            sleep 0.2
        done
    fi

    local status name ip
    status=$(run_tern status --config "$CFG" --json 2>/dev/null) || status=""
    name=$(json_top name <<<"$status")
    ip=$(json_top overlay_ip <<<"$status")
    say "joined the mesh as ${name:-?} (${ip:-?}); config $CFG, log $LOG"
    if [ -n "${GITHUB_OUTPUT:-}" ]; then
        append_github "$GITHUB_OUTPUT" "config=$CFG"
        append_github "$GITHUB_OUTPUT" "name=$name"
        append_github "$GITHUB_OUTPUT" "overlay-ip=$ip"
    fi
    append_github "${GITHUB_ENV:-}" "TERN_CONFIG=$CFG"
    if [ "$TERN" = "$STATE/bin/tern" ]; then
        append_github "${GITHUB_PATH:-}" "$STATE/bin"
    fi
    if [ -n "${TERN_KUBECONFIG:-}" ]; then
        write_kubeconfig "$TERN_KUBECONFIG"
    fi
}

# A kubeconfig for the kubernetes service $1 through the mesh, for the
# job's later steps (the job's own user writes it: the API socket lets its
# group in).
write_kubeconfig() {
    local kc=$STATE/kubeconfig out
    if ! out=$("$TERN" kubeconfig "$1" --config "$CFG" --out "$kc" 2>&1); then
        printf '%s\n' "$out" | redact >&2
        die 1 "tern kubeconfig $1 failed (TERN_KUBECONFIG): the message above says why; \`tern services --config $CFG\` lists the services offered"
    fi
    append_github "${GITHUB_ENV:-}" "KUBECONFIG=$kc"
    if [ -n "${GITHUB_OUTPUT:-}" ]; then
        append_github "$GITHUB_OUTPUT" "kubeconfig=$kc"
    fi
    say "kubeconfig for service $1: $kc (exported as KUBECONFIG)"
}

# Find or download tern as `up` does; print its path (and add a downloaded
# one's directory to $GITHUB_PATH).
install() {
    make_state_dir
    find_tern
    if [ "$TERN" = "$STATE/bin/tern" ]; then
        append_github "${GITHUB_PATH:-}" "$STATE/bin"
    fi
    printf '%s\n' "$TERN"
}

down() {
    if [ ! -d "$STATE" ]; then
        say "no state directory $STATE: no node to stop"
        return 0
    fi
    if [ -f "$CFG" ]; then
        TERN=""
        if [ -s "$STATE/tern.bin" ]; then TERN=$(<"$STATE/tern.bin"); fi
        if [ -z "$TERN" ] || [ ! -x "$TERN" ]; then
            TERN=${TERN_BIN:-$(command -v tern 2>/dev/null || true)}
        fi
        if [ -e "$STATE/sudo" ] && command -v sudo >/dev/null 2>&1; then SUDO=(sudo -n -E); fi
        if [ -z "$TERN" ]; then
            say "no tern binary to run 'tern down' with; the node (if any) is left running"
        else
            local was_running="" out rc=0 bound=()
            if command -v timeout >/dev/null 2>&1; then bound=(timeout 30); fi
            if "${bound[@]+"${bound[@]}"}" "${SUDO[@]+"${SUDO[@]}"}" "$TERN" status --config "$CFG" \
                </dev/null >/dev/null 2>&1; then
                was_running=1
            fi
            if [ "${#SUDO[@]}" -gt 0 ]; then
                out=$("${bound[@]+"${bound[@]}"}" "${SUDO[@]}" "$TERN" down --config "$CFG" 2>&1 </dev/null) || rc=$?
            else
                out=$("${bound[@]+"${bound[@]}"}" "$TERN" down --config "$CFG" 2>&1 </dev/null) || rc=$?
            fi
            if [ "$rc" -eq 0 ] && [ -n "$was_running" ]; then
                say "the node left the mesh"
            elif [ "$rc" -eq 0 ]; then
                say "no node was running (its API socket $SOCK did not answer)"
            else
                say "tern down exited with $rc (the node was probably not running): $(printf '%s' "$out" | tr '\n' ' ')"
            fi
        fi
        # A node this script started in the background and still there: stop it.
        local pid=""
        if [ -s "$STATE/tern.pid" ]; then pid=$(<"$STATE/tern.pid"); fi
        if [[ $pid =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/cmdline" ] &&
            [[ $(tr '\0' ' ' <"/proc/$pid/cmdline") != *" up --config $CFG"* ]]; then
            pid="" # that PID is some other process by now
        fi
        if [[ $pid =~ ^[0-9]+$ ]]; then
            local i
            for i in $(seq 1 20); do # a node that left may take a moment to exit
                if ! kill -0 "$pid" 2>/dev/null; then break; fi
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                say "the node (pid $pid) still runs: sending it SIGTERM"
                kill "$pid" 2>/dev/null || true
                for i in $(seq 1 50); do
                    if ! kill -0 "$pid" 2>/dev/null; then break; fi
                    sleep 0.1
                done
            fi
        fi
    else
        say "no node config in $STATE: nothing to stop"
    fi
    if [ -e "$STATE/$TERN_CI_MARKER" ]; then
        # The socket's directory belongs to the daemon's user (root under
        # sudo); a crashed daemon may have left its socket in it.
        if [ -d "$STATE/api" ] && [ "${#SUDO[@]}" -gt 0 ]; then
            "${SUDO[@]}" rm -rf "$STATE/api" || true
        fi
        rm -rf "$STATE"
        say "removed $STATE"
    else
        say "left $STATE in place: it was not made by tern-ci"
    fi
    return 0
}

case ${1:-} in
up)
    up
    ;;
down)
    # A cleanup step: whatever happens, exit 0.
    down || say "down: something went wrong (exit $?); ignored"
    exit 0
    ;;
install)
    install
    ;;
-h | --help | help)
    usage
    ;;
*)
    usage >&2
    exit 2
    ;;
esac
