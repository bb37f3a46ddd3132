# dmpay — see README.md. Every target installs what it needs through cargo.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build release install protoset test test-one-process test-clients test-sqlite check proto-check fmt migrate token clean bench fuzz fuzz-build secrets-scan chaos

## Start the server on the embedded SQLite default (./var/dmpay.db), no setup. dmpay runs
## in production mode unless told otherwise; this is a development server, so it says so.
run:
	DMPAY_ENV=development $(CARGO) run --bin dmpay -- serve

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## The `dmpay` binary (server and client commands) into cargo's bin directory
## (~/.cargo/bin), as `cargo install --path .` does.
install:
	$(CARGO) install --path . --locked --bin dmpay

## The API's descriptors (dmpay's, google.rpc's error details, health) as a protoset
## file, for tools without server reflection: grpcurl -protoset dmpay.protoset ...
protoset:
	$(CARGO) run -q --bin dmpay -- protoset --out dmpay.protoset

## The whole test suite, every integration test on both backends: SQLite, and
## PostgreSQL at DMPAY_TEST_POSTGRES_URL (the local server by default, started when it
## is down; a PostgreSQL test that cannot reach it fails rather than skips). The suite
## runs under cargo-nextest (each test in its own process, in parallel); plain `cargo
## test` runs it too, in one process per test binary. cargo-nextest is installed from
## crates.io when missing.
## The NATS tests (events on JetStream) run against the local NATS at
## DMPAY_TEST_NATS_URL, started when it is down, and fail rather than skip without it.
DMPAY_TEST_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/postgres
DMPAY_TEST_NATS_URL ?= nats://127.0.0.1:4222
NATS_UP = (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null || start-stop-daemon --start --oknodo --background \
	--exec /usr/sbin/nats-server -- -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
TEST_ENV = DMPAY_TEST_POSTGRES_URL="$(DMPAY_TEST_POSTGRES_URL)" DMPAY_TEST_REQUIRE_POSTGRES=1 \
	DMPAY_TEST_NATS_URL="$(DMPAY_TEST_NATS_URL)" DMPAY_TEST_REQUIRE_NATS=1
test:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql)" main start || true
	@$(NATS_UP)
	$(TEST_ENV) $(CARGO) nextest run --workspace --all-targets --no-fail-fast

## The clients other teams write, against a real server: the Python (grpcio) and
## TypeScript (gRPC-Web) examples, then the demo page in Debian's chromium (installed
## when missing). See .ci/clients.
test-clients:
	$(CARGO) build --bin dmpay
	.ci/clients

## The same suite under plain `cargo test`: every test of a binary in one process, as
## an IDE runs them. Nothing in dmpay is process-global (each server has its own clock),
## so the tests must not need a process of their own; CI runs this too.
test-one-process:
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql)" main start || true
	@$(NATS_UP)
	$(TEST_ENV) $(CARGO) test --workspace --all-targets

## Formatting and lints, warnings as errors; the module graph's layers (tests/layers.rs);
## the proto's lint and breaking-change check.
check: proto-check
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test --quiet --test layers

## `buf lint` (proto/buf.yaml) and `buf breaking` against the previous commit's proto
## (docs/api.md, "Proto rules"). buf comes from npm's @bufbuild/buf, installed into the
## git-ignored .cache/buf on first use.
BUF_VERSION ?= 1.75.0
BUF := .cache/buf/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix .cache/buf @bufbuild/buf@$(BUF_VERSION)
proto-check: $(BUF)
	cd proto && ../$(BUF) lint
	@if git rev-parse -q --verify HEAD~1 >/dev/null; then \
		echo "buf breaking --against HEAD~1"; \
		cd proto && ../$(BUF) breaking --against '../.git#ref=HEAD~1,subdir=proto'; \
	else \
		echo "proto-check: this clone has no previous commit to compare the proto with" >&2; exit 1; \
	fi

## The integration suite with every log at TRACE (PostgreSQL through a URL with a
## password; PostgreSQL must be up on 127.0.0.1:5432), its output scanned for card
## numbers, CVCs, JWTs, vault and JWT keys and the database password; fails on any.
## SECRETS_SCAN_FILTERS limits it to matching tests (CI: "secrets:: vault:: auth::
## access:: payments::"). See .ci/secrets-scan.
SECRETS_SCAN_FILTERS ?=
secrets-scan:
	.ci/secrets-scan $(SECRETS_SCAN_FILTERS)

## Coverage-guided fuzzing (cargo-fuzz + libFuzzer, docs/testing.md "Fuzzing") of the hostile-input
## parsers: each target runs for FUZZ_SECONDS from its seeds in fuzz/corpus/<target>
## (new inputs and the log go to the git-ignored fuzz/work/); any crash, timeout or out-
## of-memory fails the target and leaves its input in fuzz/artifacts/<target>. cargo-fuzz
## is installed from crates.io when missing; RUSTC_BOOTSTRAP=1 lets the stable
## toolchain take the sanitizer flags it needs.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= money_parse card_validate settlement_csv jwt_verify
## AddressSanitizer catches memory errors in the dependencies' unsafe code (dmpay forbids
## its own); FUZZ_SANITIZER=none builds in about two thirds of the CPU time.
FUZZ_SANITIZER ?= address
FUZZ_BUILD_FLAGS = --release --debug-assertions --sanitizer $(FUZZ_SANITIZER)
FUZZ_RUN = RUSTC_BOOTSTRAP=1 $(CARGO) fuzz

fuzz-build:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	$(FUZZ_RUN) build $(FUZZ_BUILD_FLAGS)

fuzz: fuzz-build
	@set -e; n=0; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/work/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS)s (log: fuzz/work/$$t.log)"; \
		start=$$(date +%s); \
		if ! $(FUZZ_RUN) run $(FUZZ_BUILD_FLAGS) $$t fuzz/work/$$t fuzz/corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
			> fuzz/work/$$t.log 2>&1; then \
			tail -n 80 fuzz/work/$$t.log; \
			echo "fuzz: $$t FAILED; the input is in fuzz/artifacts/$$t/" >&2; exit 1; \
		fi; \
		grep -E '^(Done|stat::(new_units_added|peak_rss_mb))' fuzz/work/$$t.log | sed 's/^/   /'; \
		echo "== fuzz $$t passed in $$(( $$(date +%s) - start ))s"; \
		n=$$((n + 1)); \
	done; \
	echo "fuzz: $$n passed, 0 failed"

## The crash test (docs/testing.md "Crash test", tests/chaos.rs): builds the release server, then
## on a fresh PostgreSQL database (on the local server, started when it is down) and on a
## fresh SQLite file runs it as a child process under concurrent sends, requests and
## refunds, SIGKILLs it CHAOS_KILLS times at random moments during CHAOS_SECONDS of load,
## retries every call that got no answer with the same key until it gets one, and checks
## the books. The seed is printed; CHAOS_SEED=N reproduces a run's choices.
CHAOS_KILLS ?= 10
CHAOS_SECONDS ?= 60
chaos: release
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql)" main start || true
	CHAOS_KILLS=$(CHAOS_KILLS) CHAOS_SECONDS=$(CHAOS_SECONDS) CHAOS_BIN="$(CURDIR)/target/release/dmpay" \
		$(CARGO) test --test chaos -- --ignored --nocapture

## The end-to-end benchmark (BENCHMARKS.md, regenerated): on fresh PostgreSQL
## (BENCH_POSTGRES_URL, a user that may create databases) and SQLite databases, the
## naive-SQL baseline and a release server driven over gRPC by the load generator
## (uniform and livestream at 64 and 256 clients, BENCH_DURATION each), then on
## PostgreSQL a database grown to a million payments (BENCH_GROWN_PAYMENTS). Not part of
## `make test`; it needs the machine to itself for honest numbers.
BENCH_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/postgres
BENCH_DURATION ?= 30s
BENCH_GROWN_PAYMENTS ?= 1000000
bench: release
	@pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$$(ls /etc/postgresql)" main start || true
	DMPAY_ENV=development ./target/release/dmpay bench report --postgres-url "$(BENCH_POSTGRES_URL)" --duration $(BENCH_DURATION) --grown-payments $(BENCH_GROWN_PAYMENTS) --out BENCHMARKS.md

fmt:
	$(CARGO) fmt --all

migrate:
	$(CARGO) run --bin dmpay -- migrate

clean:
	$(CARGO) clean
	rm -rf var
