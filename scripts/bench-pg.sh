#!/usr/bin/env bash
# The state repository on PostgreSQL against SQLite (BENCHMARKS.md, section 14): a private
# PostgreSQL cluster in a scratch directory (Debian's postgresql package; run as nobody
# when root, on a Unix socket only), then
#   1. vmm-bench repo: 8 writers at 10 ms into SQLite and into PostgreSQL, and their capacity;
#   2. vmm-bench repo --outage-run-s 75: the same 8 writers for 75 s, the server stopped
#      at 20 s for 30 s and started again.
# JSON results go to target/bench/ (repo-*.json) and stdout.
# Usage: scripts/bench-pg.sh   (after cargo build --release -p vmm-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
bench=${VMM_BENCH:-target/release/vmm-bench}
[ -x "$bench" ] || cargo build --release -p vmm-bench
dir=$(mktemp -d /tmp/vmm-bench-pg.XXXXXX)
owner=()
if [ "$(id -u)" -eq 0 ]; then chown nobody "$dir"; owner=(runuser -u nobody --); fi
pg_ctl() { "${owner[@]}" "$bin/pg_ctl" -D "$dir/data" "$@"; }
cleanup() { pg_ctl -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
"${owner[@]}" "$bin/initdb" -D "$dir/data" -U vmm -A trust --no-sync >/dev/null
start() { pg_ctl -o "-k $dir -c listen_addresses=''" -l "$dir/log" -w start >/dev/null; }
start
psql -X -q "postgresql://vmm@/postgres?host=$dir" -c "CREATE DATABASE bench"
url="postgresql://vmm@/bench?host=$dir"

"$bench" repo --pg-url "$url"

"$bench" repo --pg-url "$url" --outage-run-s 75 &
pid=$!
sleep 20
pg_ctl -m fast -w stop >/dev/null
echo "bench-pg: server stopped at $(date +%T)" >&2
sleep 30
start
echo "bench-pg: server started at $(date +%T)" >&2
wait "$pid"
