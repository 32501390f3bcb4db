//! What the machine is: cores, CPU model, memory, the disk under the work
//! directory (with a measured fsync latency), kernel, toolchain, commit.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use waymark_bench::measure::Percentiles;

fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn proc_field(file: &str, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == field).then(|| v.trim().to_owned())
    })
}

/// 4 KiB write + fsync latencies in `dir`: what every durable append or
/// store batch pays at least once.
fn fsync_probe(dir: &Path) -> Value {
    let path = dir.join("fsync-probe");
    let Ok(mut f) = std::fs::File::create(&path) else {
        return Value::Null;
    };
    let block = [7u8; 4096];
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        if f.write_all(&block).and_then(|()| f.sync_data()).is_err() {
            return Value::Null;
        }
        samples.push(t.elapsed());
    }
    let _ = std::fs::remove_file(&path);
    let p = Percentiles::of(&mut samples);
    json!({"samples": p.count, "p50_ms": p.p50_ms, "p99_ms": p.p99_ms})
}

/// Describes the machine the run happens on.
pub(crate) fn describe(work: &Path) -> Value {
    let df = command(
        "df",
        &[
            "-h",
            "--output=source,fstype,size,avail",
            &work.display().to_string(),
        ],
    )
    .and_then(|t| t.lines().nth(1).map(str::to_owned))
    .unwrap_or_default();
    let df: Vec<&str> = df.split_whitespace().collect();
    let mem_kib: u64 = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": proc_field("/proc/cpuinfo", "model name").unwrap_or_default(),
        "memory_mib": mem_kib / 1024,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "disk": {
            "work_dir": work.display().to_string(),
            "device": df.first().copied().unwrap_or(""),
            "fstype": df.get(1).copied().unwrap_or(""),
            "size": df.get(2).copied().unwrap_or(""),
            "available": df.get(3).copied().unwrap_or(""),
            "fsync_4k": fsync_probe(work),
        },
        "rustc": command("rustc", &["-V"]).unwrap_or_default(),
        "git_commit": command("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default(),
        "date_utc": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string(),
        "load_avg_at_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}
