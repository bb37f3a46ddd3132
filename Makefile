# dmpay — see README.md. Every target installs what it needs through cargo.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run build release test test-sqlite check fmt migrate token clean

## Start the server on the embedded SQLite default (./var/dmpay.db), no setup.
run:
	$(CARGO) run --bin dmpay -- serve

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## The whole test suite. PostgreSQL tests run when DMPAY_TEST_POSTGRES_URL is set
## (.ci/run sets it); unit and SQLite tests always run. The suite needs cargo-nextest
## (one process per test: some tests shift the process clock); it is installed from
## crates.io when missing.
test:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace --all-targets --no-fail-fast

## Formatting and lints, warnings as errors.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

migrate:
	$(CARGO) run --bin dmpay -- migrate

clean:
	$(CARGO) clean
	rm -rf var
