#!/usr/bin/env bash
# Runs the TypeScript client example (src/dm_client.ts) against a running dmpay server,
# over gRPC-Web on HTTP/1.1.
#
#   DMPAY_ADDR=127.0.0.1:50051 examples/typescript/run.sh
#
# Installs the pinned packages with `npm ci` (once, when node_modules is missing),
# generates the TypeScript code from proto/ into gen/ (buf and protoc-gen-es, both from
# npm), mints this run's tokens with the dmpay binary, and runs the client with tsx as
# two fresh users alice-<id> and bob-<id>.
#
# Environment:
#   DMPAY_ADDR  the server, host:port (http:// is added) or a URL (default 127.0.0.1:50051)
#   DMPAY_BIN   the dmpay binary that mints tokens (default target/debug/dmpay, from the
#               repository root); it must share the server's DMPAY_JWT_* settings, and
#               DMPAY_ENV defaults to development here, since only a development build
#               mints tokens
# Needs Node.js 20 or newer and npm.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$root/examples/typescript"
cd "$root"

export DMPAY_ADDR="${DMPAY_ADDR:-127.0.0.1:50051}"
export DMPAY_ENV="${DMPAY_ENV:-development}"
dmpay_bin="${DMPAY_BIN:-target/debug/dmpay}"

if [[ ! -x "$dmpay_bin" ]]; then
    echo "run.sh: no dmpay binary at $dmpay_bin (cargo build, or set DMPAY_BIN)" >&2
    exit 1
fi
if ! command -v npm >/dev/null; then
    echo "run.sh: npm not found; install Node.js 20 or newer" >&2
    exit 1
fi

if [[ ! -d "$here/node_modules" ]]; then
    npm --prefix "$here" ci --no-audit --no-fund
fi
npm --prefix "$here" run --silent generate

mint() { # SUB SCOPES
    "$dmpay_bin" token --sub "$1" --scope "$2" --ttl 15m
}
run_id="$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
export DMPAY_RUN_ID="$run_id"
DMPAY_TOKEN_ADMIN="$(mint tsex-platform "accounts:admin")"
DMPAY_TOKEN_TREASURY="$(mint tsex-treasury "ledger:write")"
DMPAY_TOKEN_ALICE="$(mint "alice-$run_id" "payments:read payments:write")"
DMPAY_TOKEN_BOB="$(mint "bob-$run_id" "payments:read payments:write")"
export DMPAY_TOKEN_ADMIN DMPAY_TOKEN_TREASURY DMPAY_TOKEN_ALICE DMPAY_TOKEN_BOB

cd "$here"
exec node_modules/.bin/tsx src/dm_client.ts
