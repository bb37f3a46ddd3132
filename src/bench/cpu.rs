//! Where a benchmark's CPU goes: the machine's cores split between the server, the
//! database, the load (or the in-process baseline) and idle, from Linux's `/proc`.
//!
//! On a machine that runs all three, throughput is bounded by CPU time per payment: a
//! run whose cores are all busy cannot go faster without spending less per payment. So
//! the report puts each run's CPU per payment beside its rate, and the rate it would
//! reach with every core busy (the cores over that cost), which is the most this
//! machine allows at that cost (`bench::report`). Off Linux, or where `/proc` cannot be
//! read, there is no sample and the report leaves the figures out.
//!
//! PostgreSQL is counted as every process named `postgres` on the machine, so its
//! figure is right only for a local server with nothing else running on it (a remote
//! database shows as zero, with its work outside the machine).

use std::collections::HashMap;

use serde::Serialize;

/// CPU time used so far, in the kernel's clock ticks, by the machine and the processes
/// a benchmark involves.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// Ticks of every core, busy or idle, since boot.
    machine_total: u64,
    /// Of those, idle or waiting for I/O.
    machine_idle: u64,
    /// Cores that `/proc/stat` lists.
    cores: usize,
    /// This process: the load generator, or the baseline's clients.
    own: u64,
    /// The server under load, when its process id is known: the process and its ticks.
    server: Option<(u32, u64)>,
    /// Each `postgres` process, by process id.
    postgres: HashMap<u32, u64>,
}

/// Average cores used between two samples, by whom.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuUse {
    /// Cores of the machine.
    pub cores: usize,
    /// This process: the load generator, or the baseline's clients.
    pub client: f64,
    pub server: Option<f64>,
    pub postgres: f64,
    /// Cores no process used.
    pub idle: f64,
}

impl CpuSample {
    /// Now, with the server's process when `server_pid` is given. `None` where `/proc`
    /// cannot be read.
    pub fn take(server_pid: Option<u32>) -> Option<CpuSample> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let (machine_total, machine_idle) = machine_ticks(&stat)?;
        let cores = stat.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count();
        Some(CpuSample {
            machine_total,
            machine_idle,
            cores,
            own: process_ticks(std::process::id())?,
            server: server_pid.and_then(|pid| Some((pid, process_ticks(pid)?))),
            postgres: postgres_ticks(),
        })
    }
}

impl CpuUse {
    /// What was used from `before` to `after`. `None` when no time passed.
    pub fn between(before: &CpuSample, after: &CpuSample) -> Option<CpuUse> {
        let total = after.machine_total.checked_sub(before.machine_total).filter(|t| *t > 0)?;
        let cores = after.cores.max(1);
        // A tick count as a share of the machine's, in cores.
        let in_cores = |ticks: u64| ticks as f64 / total as f64 * cores as f64;
        let idle = after.machine_idle.saturating_sub(before.machine_idle);
        // A process that ended meanwhile took its ticks with it; one that started counts
        // from zero.
        let postgres: u64 = after
            .postgres
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.postgres.get(pid).copied().unwrap_or(0)))
            .sum();
        Some(CpuUse {
            cores,
            client: in_cores(after.own.saturating_sub(before.own)),
            server: before.server.zip(after.server).map(|((_, b), (_, a))| in_cores(a.saturating_sub(b))),
            postgres: in_cores(postgres),
            idle: in_cores(idle),
        })
    }

    /// What was used from `before` (when there is one) until now, by the same server.
    pub fn since(before: Option<&CpuSample>) -> Option<CpuUse> {
        let before = before?;
        CpuUse::between(before, &CpuSample::take(before.server.map(|(pid, _)| pid))?)
    }

    /// Cores the benchmark's processes used together.
    pub fn busy(&self) -> f64 {
        self.client + self.server.unwrap_or(0.0) + self.postgres
    }

    /// Cores that neither the benchmark's processes nor idle account for: the rest of
    /// the machine.
    pub fn other(&self) -> f64 {
        (self.cores as f64 - self.busy() - self.idle).max(0.0)
    }

    /// The rate, at the same CPU time per operation, with every core busy with the
    /// benchmark's processes: the most this machine could do without spending less per
    /// operation.
    pub fn rate_with_every_core_busy(&self, rate: f64) -> f64 {
        let us = self.cpu_per_op_us(rate);
        if us > 0.0 {
            self.cores as f64 * 1e6 / us
        } else {
            0.0
        }
    }

    /// Microseconds of CPU per operation, by all the benchmark's processes, at `rate`
    /// operations per second.
    pub fn cpu_per_op_us(&self, rate: f64) -> f64 {
        if rate > 0.0 {
            self.busy() * 1e6 / rate
        } else {
            0.0
        }
    }

    /// One line: the split in cores and the cost per operation.
    pub fn summary(&self, rate: f64, op: &str) -> String {
        let server = self.server.map_or_else(String::new, |s| format!("server {s:.2}, "));
        format!(
            "cores used: {server}PostgreSQL {:.2}, client {:.2}, other {:.2}, idle {:.2} of {}; \
             {:.0} us of CPU per {op}, {:.0}/s with every core busy",
            self.postgres,
            self.client,
            self.other(),
            self.idle,
            self.cores,
            self.cpu_per_op_us(rate),
            self.rate_with_every_core_busy(rate)
        )
    }
}

/// (all ticks, idle and I/O-wait ticks) from the first line of `/proc/stat`: `cpu user
/// nice system idle iowait irq softirq steal ...` (guest time is already in user).
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line.split_whitespace().take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((fields.iter().sum(), idle))
}

/// User and system ticks of a process, from `/proc/<pid>/stat`. The command name (field
/// 2) may hold spaces and parentheses, so the fields are counted after its last `)`.
fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_process_ticks(&stat)
}

fn parse_process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid, pgrp, session, tty_nr, tpgid, flags, minflt,
    // cminflt, majflt, cmajflt, utime (14), stime (15).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Most processes looked at for `postgres` ones: a bound on the walk through `/proc`.
const PROCESSES_MAX: usize = 100_000;

fn postgres_ticks() -> HashMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return HashMap::new() };
    dir.take(PROCESSES_MAX)
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "postgres"))
        .filter_map(|pid| Some((pid, process_ticks(pid)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_are_read_after_the_command_name_whatever_it_holds() {
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0 8 0";
        assert_eq!(parse_process_ticks(stat), Some(1234 + 567));
        assert_eq!(parse_process_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn machine_ticks_add_every_state_and_count_io_wait_as_idle() {
        let stat = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n";
        assert_eq!(machine_ticks(stat), Some((100 + 5 + 50 + 800 + 20 + 3 + 2 + 10, 820)));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
    }

    fn sample(total: u64, idle: u64, own: u64, server: u64, postgres: &[(u32, u64)]) -> CpuSample {
        CpuSample {
            machine_total: total,
            machine_idle: idle,
            cores: 2,
            own,
            server: Some((7, server)),
            postgres: postgres.iter().copied().collect(),
        }
    }

    #[test]
    fn use_between_samples_is_in_cores_and_follows_postgres_processes_that_come_and_go() {
        // 1,000 ticks of a 2-core machine: each tick of a process is 0.002 cores.
        let before = sample(10_000, 4_000, 100, 1_000, &[(1, 50), (2, 70)]);
        // Process 2 ended; process 3 started and used 30 ticks.
        let after = sample(11_000, 4_300, 200, 1_250, &[(1, 250), (3, 30)]);
        let used = CpuUse::between(&before, &after).unwrap();
        assert_eq!(used.cores, 2);
        assert!((used.client - 0.2).abs() < 1e-9, "{used:?}");
        assert!((used.server.unwrap() - 0.5).abs() < 1e-9, "{used:?}");
        assert!((used.postgres - 0.46).abs() < 1e-9, "{used:?}");
        assert!((used.idle - 0.6).abs() < 1e-9, "{used:?}");
        // 1.16 cores at 1,000 operations per second: 1,160 us each; the 2 cores could
        // then do 2e6 / 1,160 per second, and 0.24 cores went elsewhere.
        assert!((used.cpu_per_op_us(1000.0) - 1160.0).abs() < 1e-6);
        assert!((used.rate_with_every_core_busy(1000.0) - 2e6 / 1160.0).abs() < 1e-6);
        assert!((used.other() - 0.24).abs() < 1e-9, "{used:?}");
        assert_eq!(used.cpu_per_op_us(0.0), 0.0);
        assert_eq!(used.rate_with_every_core_busy(0.0), 0.0);
        assert!(CpuUse::between(&after, &after).is_none(), "no time passed");
    }

    #[test]
    fn this_process_can_be_sampled_on_linux() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let before = CpuSample::take(Some(std::process::id())).expect("a sample");
        assert!(before.cores >= 1);
        // Work until the kernel has counted some of it (a tick is 10 ms on most
        // machines), for at most a few seconds of a busy machine.
        let started = std::time::Instant::now();
        let mut x = 0u64;
        let after = loop {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let now = CpuSample::take(Some(std::process::id())).expect("a sample");
            // Both counters: the process's ticks and the machine's are read from two
            // files, and one can move a tick before the other.
            let counted = now.own > before.own && now.machine_total > before.machine_total;
            if counted || started.elapsed() > std::time::Duration::from_secs(5) {
                break now;
            }
        };
        std::hint::black_box(x);
        let used = CpuUse::between(&before, &after).expect("time passed");
        assert!(used.client > 0.0, "{used:?}");
        // The server here is this process too.
        assert!(used.server.is_some_and(|s| s > 0.0), "{used:?}");
    }
}
