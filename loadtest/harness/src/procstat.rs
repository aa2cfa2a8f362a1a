//! Reading other processes from `/proc`: resident memory, CPU time and open descriptors, and a
//! description of the machine the run is on.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{anyhow, Context};
use serde::Serialize;

/// Processes to watch during a run, given on the command line as `name=pid`, or as
/// `name=comm:NAME` for every process whose command name is NAME (Postgres runs a backend per
/// connection).
#[derive(Clone, Debug)]
pub struct Watched {
    pub name: String,
    pub target: Target,
}

#[derive(Clone, Debug)]
pub enum Target {
    Pid(u32),
    Comm(String),
}

impl std::str::FromStr for Watched {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, target) = s
            .split_once('=')
            .ok_or("expected name=pid or name=comm:NAME")?;
        let target = match target.strip_prefix("comm:") {
            Some(comm) if !comm.is_empty() => Target::Comm(comm.to_string()),
            Some(_) => return Err("comm: needs a process name".into()),
            None => Target::Pid(
                target
                    .parse()
                    .map_err(|_| format!("{target} is not a pid"))?,
            ),
        };
        Ok(Watched {
            name: name.to_string(),
            target,
        })
    }
}

impl Watched {
    /// CPU seconds used so far by the watched process(es); processes that exited are not counted.
    fn cpu_secs(&self) -> f64 {
        match &self.target {
            Target::Pid(pid) => cpu_secs(*pid).unwrap_or(0.0),
            Target::Comm(comm) => pids_named(comm)
                .into_iter()
                .filter_map(|pid| cpu_secs(pid).ok())
                .sum(),
        }
    }
}

/// Every process whose `/proc/<pid>/comm` is `comm`.
fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib * 1024)
}

/// Open file descriptors of `pid`.
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count())
}

/// CPU time (user + system) `pid` has used, in seconds.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; after the name they are at 11 and 12.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU use of watched processes (and this one) between `start` and `finish`.
pub struct CpuMeter {
    watched: Vec<Watched>,
    started: Instant,
    at_start: Vec<f64>,
}

impl CpuMeter {
    pub fn start(watched: &[Watched]) -> Self {
        let mut watched = watched.to_vec();
        watched.push(Watched {
            name: "loadgen".into(),
            target: Target::Pid(std::process::id()),
        });
        let at_start = watched.iter().map(Watched::cpu_secs).collect();
        CpuMeter {
            watched,
            started: Instant::now(),
            at_start,
        }
    }

    /// Percent of one core each process used since `start` (100 = one core busy).
    pub fn finish(&self) -> BTreeMap<String, f64> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        self.watched
            .iter()
            .zip(&self.at_start)
            .map(|(w, before)| {
                let used = (w.cpu_secs() - before).max(0.0);
                (w.name.clone(), (used / wall * 1000.0).round() / 10.0)
            })
            .collect()
    }
}

/// The machine a result was measured on.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Machine {
    pub cpu_model: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        cpu_model,
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_gib: (memory_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own memory, CPU and descriptors read back as plausible numbers.
    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(rss_bytes(me).expect("rss") > 1024 * 1024);
        assert!(cpu_secs(me).expect("cpu") >= 0.0);
        assert!(fd_count(me).expect("fds") >= 3);
        assert!("gw=12".parse::<Watched>().is_ok());
        assert!("gw".parse::<Watched>().is_err());
        assert!("pg=comm:".parse::<Watched>().is_err());
        let me_by_name = std::fs::read_to_string(format!("/proc/{me}/comm")).expect("comm");
        let watched: Watched = format!("self=comm:{}", me_by_name.trim())
            .parse()
            .expect("parse");
        assert!(pids_named(me_by_name.trim()).contains(&me));
        assert!(watched.cpu_secs() >= 0.0);
    }
}
