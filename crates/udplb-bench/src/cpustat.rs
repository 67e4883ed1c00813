//! A CPU's time from `/proc/stat`: what it spent working and what the hypervisor took.
//!
//! Busy is user, nice, system, irq and softirq time, so the softirq work a balancer causes
//! counts (per-process accounting misses it). Steal, the time a virtual CPU was ready to run
//! while the host ran something else, is kept apart: it is no work of the balancer's, and on a
//! shared virtual machine it can be a quarter of a run.

use std::fs;

/// Seconds since boot of one CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    pub busy: f64,
    pub steal: f64,
}

impl CpuTimes {
    /// CPU `cpu`'s times now.
    pub fn read(cpu: usize) -> anyhow::Result<CpuTimes> {
        let stat = fs::read_to_string("/proc/stat")?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
        parse(&stat, cpu, hz)
    }

    /// What was spent between `earlier` and `self`.
    pub fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            busy: self.busy - earlier.busy,
            steal: self.steal - earlier.steal,
        }
    }
}

/// CPU `cpu`'s line of `/proc/stat` text, in seconds (`hz` ticks per second).
fn parse(stat: &str, cpu: usize, hz: f64) -> anyhow::Result<CpuTimes> {
    let name = format!("cpu{cpu}");
    let fields: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix(&name).filter(|r| r.starts_with(' ')))
        .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/stat"))?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    anyhow::ensure!(fields.len() >= 8, "short {name} line in /proc/stat");
    // user nice system idle iowait irq softirq steal (guest time is inside user)
    let busy = fields[..3].iter().sum::<u64>() + fields[5] + fields[6];
    Ok(CpuTimes {
        busy: busy as f64 / hz,
        steal: fields[7] as f64 / hz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  54093 17 15053 51271 879 0 2590 5646 0 0\n\
                        cpu0 26635 14 7264 26665 149 0 1205 2776 0 0\n\
                        cpu1 27457 3 7788 24605 730 11 1384 2869 0 0\n";

    #[test]
    fn busy_leaves_out_idle_iowait_and_steal() {
        let t = parse(STAT, 1, 100.0).unwrap();
        assert_eq!(t.busy, (27457 + 3 + 7788 + 11 + 1384) as f64 / 100.0);
        assert_eq!(t.steal, 28.69);
        let t0 = parse(STAT, 0, 100.0).unwrap();
        assert_eq!(t0.busy, (26635 + 14 + 7264 + 1205) as f64 / 100.0);
    }

    #[test]
    fn unknown_cpus_and_short_lines_are_errors() {
        assert!(parse(STAT, 2, 100.0).is_err());
        assert!(parse("cpu1 1 2 3\n", 1, 100.0).is_err());
        // "cpu1" must not match "cpu10".
        assert!(parse("cpu10 1 2 3 4 5 6 7 8\n", 1, 100.0).is_err());
    }

    #[test]
    fn since_subtracts() {
        let a = CpuTimes {
            busy: 1.0,
            steal: 0.5,
        };
        let b = CpuTimes {
            busy: 3.5,
            steal: 0.75,
        };
        assert_eq!(
            b.since(a),
            CpuTimes {
                busy: 2.5,
                steal: 0.25
            }
        );
    }
}
