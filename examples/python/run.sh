#!/usr/bin/env bash
# Runs the Python client example (dm_client.py) against a running dmpay server.
#
#   DMPAY_ADDR=127.0.0.1:50051 examples/python/run.sh
#
# Makes a virtualenv in .cache/pyvenv (once), installs requirements.txt, generates the
# Python stubs from proto/ into .cache/pystubs, mints this run's tokens with the dmpay
# binary, and runs the client as two fresh users alice-<id> and bob-<id>.
#
# Environment:
#   DMPAY_ADDR  the server, host:port (default 127.0.0.1:50051)
#   DMPAY_BIN   the dmpay binary that mints tokens (default target/debug/dmpay); it must
#               share the server's DMPAY_JWT_* settings, and DMPAY_ENV defaults to
#               development here, since only a development build mints tokens
#   PYTHON      the interpreter that makes the virtualenv (default python3, 3.10 or newer)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

export DMPAY_ADDR="${DMPAY_ADDR:-127.0.0.1:50051}"
export DMPAY_ENV="${DMPAY_ENV:-development}"
dmpay_bin="${DMPAY_BIN:-target/debug/dmpay}"
python="${PYTHON:-python3}"
venv=.cache/pyvenv
stubs=.cache/pystubs

if [[ ! -x "$dmpay_bin" ]]; then
    echo "run.sh: no dmpay binary at $dmpay_bin (cargo build, or set DMPAY_BIN)" >&2
    exit 1
fi

if [[ ! -x "$venv/bin/python" ]]; then
    if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
        echo "run.sh: $python cannot make a virtualenv; on Debian: apt-get install python3-venv" >&2
        exit 1
    fi
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r examples/python/requirements.txt

rm -rf "$stubs"
mkdir -p "$stubs"
"$venv/bin/python" -m grpc_tools.protoc -Iproto \
    --python_out="$stubs" --grpc_python_out="$stubs" proto/dmpay/v1/*.proto

mint() { # SUB SCOPES
    "$dmpay_bin" token --sub "$1" --scope "$2" --ttl 15m
}
run_id="$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
export DMPAY_RUN_ID="$run_id"
DMPAY_TOKEN_ADMIN="$(mint pyex-platform "accounts:admin")"
DMPAY_TOKEN_TREASURY="$(mint pyex-treasury "ledger:write")"
DMPAY_TOKEN_ALICE="$(mint "alice-$run_id" "payments:read payments:write")"
DMPAY_TOKEN_BOB="$(mint "bob-$run_id" "payments:read payments:write")"
export DMPAY_TOKEN_ADMIN DMPAY_TOKEN_TREASURY DMPAY_TOKEN_ALICE DMPAY_TOKEN_BOB

PYTHONPATH="$stubs${PYTHONPATH:+:$PYTHONPATH}" exec "$venv/bin/python" examples/python/dm_client.py
