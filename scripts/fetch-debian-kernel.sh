#!/usr/bin/env bash
# Fetches the kernel of Debian's `linux-image-cloud-amd64` package for the Linux boot test
# (tests/tests/linux.rs).
#
#   scripts/fetch-debian-kernel.sh [DEST_DIR]
#
# DEST_DIR defaults to target/debian-kernel in the repository (or under $CARGO_TARGET_DIR).
# Writes there:
#   vmlinuz   the package's boot/vmlinuz-* as shipped (a bzImage);
#   vmlinux   the ELF kernel inside it, decompressed here on the host. On this project's
#             nested KVM the bzImage's own decompressor runs at CPL 0, ~4000x slower than
#             native, and takes minutes; the test boots vmlinux, which prints its first
#             lines within seconds (see DESIGN.md, "The machines here");
#   VERSION   the name of the .deb they came from.
# Does nothing if both kernels are there already. Needs apt-get, apt-cache, dpkg-deb and
# the decompressor of the bzImage's payload (lz4 for Debian 12's kernels; gzip, xz or zstd
# for others). Installs nothing; runs `apt-get update` (as root) only if the package lists
# do not know the package.
set -euo pipefail

META=linux-image-cloud-amd64
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEST=${1:-${CARGO_TARGET_DIR:-$REPO/target}/debian-kernel}

say() { printf 'fetch-debian-kernel: %s\n' "$*" >&2; }
die() {
    say "error: $*"
    exit 1
}
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: $2"; }

if [[ -e "$DEST/vmlinuz" && -e "$DEST/vmlinux" ]]; then
    say "$DEST/vmlinuz and $DEST/vmlinux are there already; nothing to do"
    exit 0
fi

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
chmod 0755 "$TMP" # apt-get download drops to the _apt user, who must reach $TMP/deb

# Whether file $1 is a bzImage: boot-protocol signature "HdrS" at offset 0x202.
is_bzimage() { [[ "$(dd if="$1" bs=1 skip=514 count=4 status=none)" == HdrS ]]; }

# Little-endian unsigned integer of $3 bytes at offset $2 of file $1.
le() { od -An -tu"$3" -j "$2" -N "$3" --endian=little "$1" | tr -d ' '; }

# The versioned package the metapackage depends on (e.g. linux-image-6.1.0-48-cloud-amd64),
# or nothing.
resolve() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$META" 2>/dev/null |
        sed -n 's/^ *|\{0,1\}Depends: *//p' |
        grep -E '^linux-image-[0-9][^ ]*-cloud-amd64(-unsigned)?$' |
        head -n 1 || true
}

# Downloads the package and copies its bzImage to $DEST/vmlinuz.
fetch_vmlinuz() {
    local pkg deb kernel
    for tool in apt-get apt-cache dpkg-deb; do
        need "$tool" "this script needs a Debian-based host"
    done
    pkg=$(resolve)
    if [[ -z "$pkg" ]]; then
        say "$META is not in the package lists; running apt-get update"
        apt-get update -qq || die "apt-get update failed (are you root, and is the archive reachable?)"
        pkg=$(resolve)
    fi
    [[ -n "$pkg" ]] || die "cannot find the kernel package $META depends on (is Debian's main archive in the apt sources?)"
    say "$META depends on $pkg; downloading it"

    mkdir -m 0777 "$TMP/deb"
    if ! (cd "$TMP/deb" && apt-get download -q "$pkg"); then
        # A stale package list can name a version the mirror no longer has.
        say "download failed; refreshing the package lists and retrying"
        apt-get update -qq || die "apt-get update failed"
        pkg=$(resolve)
        [[ -n "$pkg" ]] || die "cannot find the kernel package $META depends on"
        (cd "$TMP/deb" && apt-get download -q "$pkg") || die "apt-get download $pkg failed"
    fi
    deb=$(find "$TMP/deb" -maxdepth 1 -name '*.deb' -print -quit)
    [[ -n "$deb" ]] || die "apt-get download left no .deb behind"

    say "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$TMP/root" || die "dpkg-deb -x $(basename "$deb") failed"
    kernel=$(find "$TMP/root/boot" -maxdepth 1 -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
    [[ -n "$kernel" ]] || die "$(basename "$deb") holds no boot/vmlinuz-*"
    is_bzimage "$kernel" || die "$(basename "$kernel") is not a bzImage"

    mkdir -p "$DEST"
    rm -f "$DEST/vmlinux" # it came from another vmlinuz
    cp "$kernel" "$DEST/vmlinuz.partial"
    basename "$deb" >"$DEST/VERSION"
    mv "$DEST/vmlinuz.partial" "$DEST/vmlinuz"
    say "wrote $DEST/vmlinuz ($(basename "$kernel"), $(stat -c %s "$DEST/vmlinuz") bytes)"
}

# Decompresses the payload of $DEST/vmlinuz (the ELF kernel) into $DEST/vmlinux.
extract_vmlinux() {
    local bz=$DEST/vmlinuz setup_sects off len magic payload=$TMP/payload out=$TMP/vmlinux
    is_bzimage "$bz" || die "$bz is not a bzImage"
    setup_sects=$(le "$bz" $((0x1f1)) 1)
    ((setup_sects != 0)) || setup_sects=4
    # payload_offset and payload_length (boot protocol 2.08+) locate the compressed kernel
    # in the protected-mode part, which follows the boot sector and the setup sectors.
    off=$(((setup_sects + 1) * 512 + $(le "$bz" $((0x248)) 4)))
    len=$(le "$bz" $((0x24c)) 4)
    ((len > 4)) || die "$bz has no payload (boot protocol older than 2.08?)"
    dd if="$bz" of="$payload" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" \
        status=none || die "cannot read the payload of $bz"
    magic=$(od -An -tx1 -N 6 "$payload" | tr -d ' \n')
    # The kernel build appends the uncompressed size (4 bytes) to the payload; gzip reads
    # it as its own trailer, the other formats must not see it.
    [[ $magic == 1f8b* ]] || truncate -s $((len - 4)) "$payload"
    case $magic in
    1f8b*) need gzip "install gzip" && gzip -dc "$payload" >"$out" ;;
    02214c18*) need lz4 "install the lz4 package" && lz4 -dc "$payload" >"$out" ;;
    fd377a585a00) need xz "install xz-utils" && xz -dc "$payload" >"$out" ;;
    28b52ffd*) need zstd "install zstd" && zstd -qdc "$payload" >"$out" ;;
    *) die "$bz: unknown payload compression (magic $magic)" ;;
    esac || die "cannot decompress the payload of $bz"
    [[ "$(od -An -tx1 -N 4 "$out" | tr -d ' \n')" == 7f454c46 ]] ||
        die "the payload of $bz is not an ELF file"
    mv "$out" "$DEST/vmlinux.partial"
    mv "$DEST/vmlinux.partial" "$DEST/vmlinux"
    say "wrote $DEST/vmlinux ($(stat -c %s "$DEST/vmlinux") bytes, the ELF kernel inside vmlinuz)"
}

# (Not `[[ ]] || fetch_vmlinuz`: bash ignores `set -e` inside a function called that way.)
if [[ ! -e "$DEST/vmlinuz" ]]; then
    fetch_vmlinuz
fi
extract_vmlinux
