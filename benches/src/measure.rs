//! Measurement helpers: process CPU time, latency percentiles, and the
//! resident memory of a process.

use std::time::Duration;

use serde::Serialize;

/// CPU time this process has used so far (`getrusage(RUSAGE_SELF)`, all
/// threads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// User time.
    pub user: Duration,
    /// System time.
    pub system: Duration,
}

fn timeval(t: nix::sys::time::TimeVal) -> Duration {
    Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000)
}

impl CpuTime {
    /// The CPU time used so far; zero if `getrusage` fails.
    pub fn now() -> Self {
        match nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            Ok(u) => Self {
                user: timeval(u.user_time()),
                system: timeval(u.system_time()),
            },
            Err(_) => Self::default(),
        }
    }

    /// CPU time used since `earlier`.
    pub fn since(&self, earlier: &CpuTime) -> CpuTime {
        CpuTime {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }

    /// User + system seconds.
    pub fn total_secs(&self) -> f64 {
        (self.user + self.system).as_secs_f64()
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

impl Percentiles {
    /// Percentiles of `samples` (nearest rank); all zero when empty.
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let n = samples.len();
        let rank = |q: f64| {
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            samples[i].as_secs_f64() * 1e3
        };
        let sum: f64 = samples.iter().map(Duration::as_secs_f64).sum();
        Self {
            count: n,
            p50_ms: rank(0.50),
            p99_ms: rank(0.99),
            p999_ms: rank(0.999),
            max_ms: samples[n - 1].as_secs_f64() * 1e3,
            mean_ms: sum / n as f64 * 1e3,
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmHWM`, `VmRSS`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// CPU seconds (user + system) used so far by every process whose command
/// name is `comm` (e.g. `java`: the Kafka and Cassandra JVMs of
/// `scripts/dev-services`), from `/proc/<pid>/stat`. Linux reports these
/// in clock ticks of 1/100 s (`USER_HZ`).
pub fn processes_cpu_secs(comm: &str) -> f64 {
    const USER_HZ: f64 = 100.0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for entry in entries.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ...`: comm may hold spaces, so split at the
        // last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if stat.get(open + 1..close) != Some(comm) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 of stat(5) (utime, stime) are the 12th and 13th
        // after the comm.
        let value = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ticks += value(11) + value(12);
    }
    ticks as f64 / USER_HZ
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<Duration> = (1..=1000).rev().map(Duration::from_millis).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!(p.count, 1000);
        assert_eq!(p.p50_ms, 500.0);
        assert_eq!(p.p99_ms, 990.0);
        assert_eq!(p.p999_ms, 999.0);
        assert_eq!(p.max_ms, 1000.0);
        assert_eq!(Percentiles::of(&mut []).count, 0);
    }

    #[test]
    fn own_status_and_cpu_are_readable() {
        assert!(proc_status_kib(std::process::id(), "VmHWM").unwrap() > 0);
        let a = CpuTime::now();
        let mut x = 0u64;
        for i in 0..1_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(CpuTime::now().since(&a).total_secs() >= 0.0);
    }
}
