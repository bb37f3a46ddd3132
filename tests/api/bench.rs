//! A short smoke run of the payments load generator against the real server: it funds
//! its users, drives the scenario and checks the ledger afterwards. (Throughput is
//! measured by `dmpay bench`, never asserted here.)

use std::time::Duration;

use dmpay::bench::payments::{run, Options, Scenario};

use crate::backend_tests;
use crate::helpers::*;

async fn load_generator_smoke_run(app: TestApp) {
    for scenario in [Scenario::Livestream, Scenario::Uniform] {
        let options = Options {
            addr: format!("http://{}", app.addr),
            clients: 4,
            duration: Duration::from_millis(800),
            scenario,
            users: 6,
            // The test server runs in this process.
            server_pid: Some(std::process::id()),
        };
        let report = run(&app.config, options).await.unwrap();
        assert!(report.payments > 0, "{report:?}");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(report.ledger_verified);
        if scenario == Scenario::Livestream {
            assert_eq!(report.seller_balance_ok, Some(true));
        }
        let table = report.table();
        assert!(
            table.contains("payments/s") && table.contains("p99 ms") && table.contains("ledger verify: OK"),
            "{table}"
        );
        if cfg!(target_os = "linux") {
            let cpu = report.cpu.expect("CPU use, from /proc");
            assert!(cpu.client > 0.0 && cpu.server.is_some_and(|s| s > 0.0), "{cpu:?}");
            assert!(table.contains("us of CPU per payment"), "{table}");
        }
    }
}

backend_tests!(load_generator_smoke_run);
