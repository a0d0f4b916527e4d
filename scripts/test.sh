#!/usr/bin/env bash
# The project's test command: everything a fresh machine needs, then the whole suite.
# Usage: scripts/test.sh            (CI runs exactly this through .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== set-up"
# Debian packages the set-up needs: lz4 unpacks the cloud kernel's payload, gcc builds
# SQLite for rusqlite (bundled), curl speaks HTTP to the control socket, prlimit fills
# the monitor's descriptor table in the API tests, prometheus (server and promtool) scrapes
# two monitors in a test, strace watches the shipped binary for refused system calls,
# iproute2 makes the network tests' namespaces, postgresql runs the state repository's
# PostgreSQL tests. Installed only when missing.
missing=()
command -v lz4 >/dev/null 2>&1 || missing+=(lz4)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v dpkg-deb >/dev/null 2>&1 || missing+=(dpkg)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v prlimit >/dev/null 2>&1 || missing+=(util-linux)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
# PostgreSQL: tests/tests/postgres.rs starts a private server (initdb, pg_ctl) and uses psql.
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo="sudo"; fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The Linux boot test needs Debian's cloud kernel; fetch it once into target/.
bash scripts/fetch-debian-kernel.sh target/debian-kernel

echo "== build (also builds the test kernels into target/test-kernels/, and vmm-learn beside"
echo "   vmm: tests/tests/train.rs and learn_online.rs run it)"
cargo build --workspace --all-targets
# The binary that ships: tests/tests/shipped.rs runs it (panic = "unwind", seccomp on).
cargo build --release -p vmm

echo "== style (rustfmt, clippy with warnings as errors)"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
cargo test --workspace -- --test-threads="${TEST_THREADS:-2}"
