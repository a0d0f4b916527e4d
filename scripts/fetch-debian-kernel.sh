#!/usr/bin/env bash
# Fetches the kernel of Debian's `linux-image-cloud-amd64` package (a bzImage) for the
# Linux boot test (tests/tests/linux.rs).
#
#   scripts/fetch-debian-kernel.sh [DEST_DIR]      (default: target/debian-kernel)
#
# Writes DEST_DIR/vmlinuz (and DEST_DIR/VERSION, the package it came from). Does nothing if
# DEST_DIR/vmlinuz already exists. Needs apt-get, apt-cache and dpkg-deb (a Debian or
# Ubuntu host with Debian's archive in its sources); nothing is installed on the host.
set -euo pipefail

META=linux-image-cloud-amd64
DEST=${1:-target/debian-kernel}

say() { printf 'fetch-debian-kernel: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ -e "$DEST/vmlinuz" ]]; then
    say "$DEST/vmlinuz already exists; nothing to do"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: this script needs a Debian-based host"
done

# The metapackage depends on the versioned package that holds the kernel,
# e.g. linux-image-6.1.0-48-cloud-amd64. Prints its name, or nothing.
resolve() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$META" 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: *//p' \
        | grep -E '^linux-image-[0-9][^ ]*-cloud-amd64(-unsigned)?$' \
        | head -n 1 || true
}

PKG=$(resolve)
if [[ -z "$PKG" ]]; then
    say "$META is not in the package lists; running apt-get update"
    apt-get update -qq || die "apt-get update failed (are you root, and is the archive reachable?)"
    PKG=$(resolve)
fi
[[ -n "$PKG" ]] || die "cannot resolve the kernel package that $META depends on (is Debian's main archive in the apt sources?)"
say "$META -> $PKG"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# apt-get download runs as the unprivileged _apt user when it can; let it write here.
chmod 0777 "$TMP"

download() { (cd "$TMP" && apt-get download -q "$PKG"); }
if ! download; then
    # A stale package list can name a version the mirror no longer has.
    say "download failed; refreshing the package lists and retrying"
    apt-get update -qq || die "apt-get update failed"
    PKG=$(resolve)
    [[ -n "$PKG" ]] || die "cannot resolve the kernel package that $META depends on"
    download || die "apt-get download $PKG failed"
fi

DEB=$(find "$TMP" -maxdepth 1 -name '*.deb' -print -quit)
[[ -n "$DEB" ]] || die "apt-get download left no .deb in $TMP"
say "extracting $(basename "$DEB")"
dpkg-deb -x "$DEB" "$TMP/root" || die "dpkg-deb -x $DEB failed"

KERNEL=$(find "$TMP/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
[[ -n "$KERNEL" ]] || die "$(basename "$DEB") holds no boot/vmlinuz-*"
# A bzImage carries the boot-protocol signature "HdrS" at offset 0x202.
[[ "$(dd if="$KERNEL" bs=1 skip=514 count=4 2>/dev/null)" == HdrS ]] \
    || die "$KERNEL is not a bzImage"

mkdir -p "$DEST"
cp "$KERNEL" "$DEST/vmlinuz.partial"
basename "$DEB" >"$DEST/VERSION"
mv "$DEST/vmlinuz.partial" "$DEST/vmlinuz"
say "wrote $DEST/vmlinuz ($(basename "$KERNEL"), $(stat -c %s "$DEST/vmlinuz") bytes)"
