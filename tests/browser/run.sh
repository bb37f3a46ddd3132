#!/usr/bin/env bash
# Runs the demo page's browser test (demo.test.mjs) against a dmpay server of its own.
#
#   tests/browser/run.sh
#
# It installs playwright-core into tests/browser/node_modules when missing, starts
# `dmpay serve` in development mode on a free port with a temporary SQLite database,
# waits for it, runs the test in Debian's chromium (apt-get install chromium) and stops
# the server.
#
# By default the test opens the page the binary serves (GET /demo), which is
# src/api/demo.html as it was when the binary was built. To test the working copy of
# the page without a rebuild, DEMO_WORKING_COPY=1 serves src/api/demo.html from a
# local static server and points it at the API with ?api= (allowed by
# DMPAY_CORS_ORIGINS).
#
# Environment:
#   DMPAY_BIN          the server binary (default target/debug/dmpay)
#   DEMO_WORKING_COPY  1: test src/api/demo.html as it is now, not the binary's copy
#   CHROMIUM           the browser (default /usr/bin/chromium)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

bin="${DMPAY_BIN:-target/debug/dmpay}"
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [[ ! -x "$CHROMIUM" ]]; then
  echo "no chromium at $CHROMIUM; install it with: apt-get install chromium" >&2
  exit 1
fi
if [[ ! -x "$bin" ]]; then
  echo "no dmpay binary at $bin; build it (cargo build) or set DMPAY_BIN" >&2
  exit 1
fi
if [[ ! -d "$here/node_modules/playwright-core" ]]; then
  echo "installing playwright-core into tests/browser/node_modules"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

tmp="$(mktemp -d)"
server_pid=""
page_pid=""
# Stops what this script started (by pid) and keeps the script's exit status.
cleanup() {
  local rc=$?
  for pid in $page_pid $server_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

port="$(free_port)"
api="http://127.0.0.1:$port"
cors=""
if [[ "${DEMO_WORKING_COPY:-0}" == 1 ]]; then
  page_port="$(free_port)"
  cors="http://127.0.0.1:$page_port"
fi

DMPAY_ENV=development \
  DMPAY_DATABASE_URL="sqlite://$tmp/dmpay.db" \
  DMPAY_GRPC_ADDR="127.0.0.1:$port" \
  DMPAY_METRICS_ADDR=off \
  DMPAY_CORS_ORIGINS="$cors" \
  "$bin" serve >"$tmp/server.log" 2>&1 &
server_pid=$!

# Up when it hands out a demo token (development mode only).
for _ in $(seq 1 100); do
  if curl -fsS "$api/demo/token?user=probe" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$server_pid" 2>/dev/null; then
    echo "dmpay exited while starting; its log:" >&2
    cat "$tmp/server.log" >&2
    exit 1
  fi
  sleep 0.2
done
if ! curl -fsS "$api/demo/token?user=probe" >/dev/null 2>&1; then
  echo "dmpay did not answer at $api within 20s; its log:" >&2
  cat "$tmp/server.log" >&2
  exit 1
fi
echo "$("$bin" --version 2>/dev/null || echo dmpay) serving at $api (database in $tmp)"

if [[ "${DEMO_WORKING_COPY:-0}" == 1 ]]; then
  mkdir "$tmp/page"
  cp src/api/demo.html "$tmp/page/demo.html"
  python3 -m http.server "$page_port" --bind 127.0.0.1 --directory "$tmp/page" >"$tmp/page.log" 2>&1 &
  page_pid=$!
  for _ in $(seq 1 50); do
    curl -fsS "http://127.0.0.1:$page_port/demo.html" >/dev/null 2>&1 && break
    sleep 0.1
  done
  demo_url="http://127.0.0.1:$page_port/demo.html?api=$api"
  echo "testing the working copy src/api/demo.html"
else
  demo_url="$api/demo"
  if ! curl -fsS "$demo_url" | cmp -s - src/api/demo.html; then
    echo "note: the binary's /demo differs from src/api/demo.html (rebuild, or DEMO_WORKING_COPY=1)" >&2
  fi
fi

status=0
DEMO_URL="$demo_url" node "$here/demo.test.mjs" || status=$?
if [[ "$status" != 0 ]]; then
  echo "--- dmpay log (last 40 lines) ---" >&2
  tail -n 40 "$tmp/server.log" >&2
fi
exit "$status"
