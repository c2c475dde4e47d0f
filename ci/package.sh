#!/usr/bin/env bash
# package.sh: build Tern's release archives and their SHA256SUMS.
#
#   ci/package.sh [--version V] [--target TRIPLE] [--out DIR] [--bin-dir DIR]
#
# Builds `tern` and `tern-lighthouse` (cargo build --release --locked, for
# TRIPLE when given) and writes into DIR (default target/dist):
#
#   tern-<version>-<arch>-linux.tar.gz        what a machine installs:
#       tern-<version>-<arch>-linux/
#           bin/tern, bin/tern-lighthouse      stripped of debug info
#           config/                            the example configs
#           systemd/                           the service units (dist/systemd)
#           README.md, LICENSE, BUILDINFO      BUILDINFO: version, commit,
#                                              target, rustc, the glibc needed
#   tern-<version>-<arch>-linux-debug.tar.gz  the debug info split off
#       (bin/tern.debug, bin/tern-lighthouse.debug; each stripped binary
#       names its file in a .gnu_debuglink section, so gdb finds it)
#   SHA256SUMS                                 `sha256sum` lines for every
#       .tar.gz in DIR (archives of other arches built into the same DIR are
#       listed too), checked with `sha256sum -c SHA256SUMS`
#
# <arch> is the target's first component (x86_64, aarch64), the name
# `uname -m` gives on such a machine; ci/tern-ci.sh downloads
# tern-<version>-$(uname -m)-linux.tar.gz and checks it against SHA256SUMS.
#
# Linking: the binaries link glibc dynamically (nothing else beyond the C
# runtime); BUILDINFO and this script's last line say the newest glibc symbol
# version they need, which is the oldest glibc they run on.
#
# Options:
#   --version V    the version in the names; default: the workspace's (Cargo.toml).
#                  The binaries' `tern --version` must say the same.
#   --target T     a Rust target triple (e.g. aarch64-unknown-linux-gnu); the
#                  cross linker comes from cargo's config or the environment
#                  (CARGO_TARGET_<TRIPLE>_LINKER). Default: the host.
#   --out DIR      where the archives go (default target/dist).
#   --bin-dir DIR  package the binaries already in DIR instead of building
#                  (the tests package the debug build this way).
#
# Environment: OBJCOPY (default objcopy; for a foreign target, e.g.
# aarch64-linux-gnu-objcopy), OBJDUMP likewise, SOURCE_DATE_EPOCH (the files'
# time in the archives; default the last commit's time, so two runs on the
# same commit give the same archives), GZIP_LEVEL (default 9; the tests,
# packaging a debug build, use 1).
#
# Exit codes: 0 written; 1 a step failed (the message says which); 2 usage.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() {
    local code=$1
    shift
    echo "package.sh: $*" >&2
    exit "$code"
}

usage() {
    sed -n '2,/^$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

version="" target="" out="$ROOT/target/dist" bin_dir=""
case ${GZIP_LEVEL:-9} in
[1-9]) ;;
*) die 2 "GZIP_LEVEL=$GZIP_LEVEL: use 1 to 9" ;;
esac
while [ $# -gt 0 ]; do
    case $1 in
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --target) target=${2:?--target needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a directory}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die 2 "unknown argument: $1" ;;
    esac
done

for tool in tar gzip sha256sum "${OBJCOPY:-objcopy}" "${OBJDUMP:-objdump}"; do
    command -v "$tool" >/dev/null 2>&1 || die 1 "$tool is missing (Debian: binutils, coreutils, tar, gzip)"
done
OBJCOPY=${OBJCOPY:-objcopy}
OBJDUMP=${OBJDUMP:-objdump}

workspace_version() {
    sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -n 1
}
if [ -z "$version" ]; then version=$(workspace_version); fi
version=${version#v}
case $version in
'' | *[!0-9A-Za-z.+-]*) die 2 "--version ${version:-(empty)}: use a version such as 0.1.0" ;;
esac

host_triple() { rustc -vV | sed -n 's/^host: //p'; }
triple=${target:-$(host_triple)}
arch=${triple%%-*}
case $triple in
*-linux-*) ;;
*) die 2 "target $triple: only Linux targets are packaged" ;;
esac

if [ -z "$bin_dir" ]; then
    args=(build --release --locked -p tern-node -p tern-lighthouse)
    if [ -n "$target" ]; then args+=(--target "$target"); fi
    echo "package.sh: cargo ${args[*]}" >&2
    (cd "$ROOT" && cargo "${args[@]}") || die 1 "cargo build failed"
    if [ -n "$target" ]; then
        bin_dir=$ROOT/target/$target/release
    else
        bin_dir=$ROOT/target/release
    fi
fi
for bin in tern tern-lighthouse; do
    [ -x "$bin_dir/$bin" ] || die 1 "$bin_dir/$bin is missing or not executable"
done
if [ -z "$target" ] || [ "$triple" = "$(host_triple)" ]; then
    said=$("$bin_dir/tern" --version) || die 1 "$bin_dir/tern --version failed"
    [ "${said##* }" = "$version" ] || die 1 "$bin_dir/tern says \"$said\", not version $version; pass --version or rebuild"
fi

name=tern-$version-$arch-linux
work=$(mktemp -d "${TMPDIR:-/tmp}/tern-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/$name
debug_stage=$work/$name-debug
mkdir -p "$stage/bin" "$stage/config" "$stage/systemd" "$debug_stage/bin"

glibc_needed=""
for bin in tern tern-lighthouse; do
    cp "$bin_dir/$bin" "$work/$bin.full"
    "$OBJCOPY" --only-keep-debug "$work/$bin.full" "$debug_stage/bin/$bin.debug" ||
        die 1 "$OBJCOPY --only-keep-debug $bin failed"
    "$OBJCOPY" --strip-debug --remove-section=.comment \
        --add-gnu-debuglink="$debug_stage/bin/$bin.debug" \
        "$work/$bin.full" "$stage/bin/$bin" || die 1 "$OBJCOPY --strip-debug $bin failed"
    chmod 755 "$stage/bin/$bin"
    chmod 644 "$debug_stage/bin/$bin.debug"
    rm "$work/$bin.full"
    needed=$("$OBJDUMP" -T "$stage/bin/$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -uV | tail -n 1 || true)
    if [ -n "$needed" ]; then
        glibc_needed=$(printf '%s\n%s\n' "$glibc_needed" "${needed#GLIBC_}" | sed '/^$/d' | sort -V | tail -n 1)
    fi
done

cp "$ROOT"/config/*.toml "$stage/config/"
if compgen -G "$ROOT/dist/systemd/*.service" >/dev/null; then
    cp "$ROOT"/dist/systemd/*.service "$stage/systemd/"
else
    die 1 "dist/systemd has no service units"
fi
cp "$ROOT/README.md" "$ROOT/LICENSE" "$stage/"
commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
{
    echo "version: $version"
    echo "commit: $commit"
    echo "target: $triple"
    echo "rustc: $(rustc --version)"
    echo "linking: dynamic, glibc ${glibc_needed:-(none)} or newer; no other shared libraries beyond the C runtime"
    echo "debug info: split off into $name-debug.tar.gz (bin/*.debug)"
} >"$stage/BUILDINFO"

epoch=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}
pack() { # DIR ARCHIVE: a reproducible .tar.gz of DIR (relative to $work)
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
        --format=gnu -C "$work" -cf - "$1" | gzip -n "-${GZIP_LEVEL:-9}" >"$2"
}
mkdir -p "$out"
pack "$name" "$out/$name.tar.gz"
pack "$name-debug" "$out/$name-debug.tar.gz"
(cd "$out" && sha256sum -- *.tar.gz >SHA256SUMS.new && mv SHA256SUMS.new SHA256SUMS)
(cd "$out" && sha256sum --quiet -c SHA256SUMS) || die 1 "SHA256SUMS does not verify in $out"

for f in "$name.tar.gz" "$name-debug.tar.gz"; do
    echo "package.sh: $out/$f ($(du -h "$out/$f" | cut -f1))" >&2
done
echo "package.sh: linking: dynamic, needs glibc ${glibc_needed:-(none)} or newer" >&2
