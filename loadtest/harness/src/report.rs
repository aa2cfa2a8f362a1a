//! Result files: every workload writes one JSON document with the machine, the command line and
//! the date beside its numbers, so a number in `docs/benchmarks.md` can be traced to its run.

use std::path::Path;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procstat::{machine, Machine};

/// Percentiles of a latency histogram recorded in microseconds, reported in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn from_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: (h.mean() / 1000.0 * 1000.0).round() / 1000.0,
        }
    }
}

/// A histogram for latencies in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

/// The envelope every result file has.
#[derive(Serialize)]
pub struct Envelope<T> {
    pub workload: String,
    pub date: String,
    pub command: String,
    pub machine: Machine,
    pub result: T,
}

/// Writes `result` with its envelope to `path` (creating the directory) and prints it.
pub fn write<T: Serialize>(path: &Path, workload: &str, result: T) -> anyhow::Result<()> {
    let envelope = Envelope {
        workload: workload.to_string(),
        date: utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: machine(),
        result,
    };
    let json = serde_json::to_string_pretty(&envelope)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    println!("{json}");
    eprintln!("loadgen: wrote {}", path.display());
    Ok(())
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without a date crate.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Percentiles come out in milliseconds from microsecond samples.
    #[test]
    fn latency_in_milliseconds() {
        let mut h = micros_histogram();
        for us in 1..=1000u64 {
            h.record(us * 10).expect("record");
        }
        let l = Latency::from_micros(&h);
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 5.0).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 10.0).abs() < 0.01, "{l:?}");
    }

    /// The date format is the one the docs quote.
    #[test]
    fn utc_now_is_iso() {
        let now = utc_now();
        assert_eq!(now.len(), 20, "{now}");
        assert!(now.starts_with("20") && now.ends_with('Z'), "{now}");
    }
}
