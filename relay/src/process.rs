//! The relay process's own CPU, memory and descriptors, read from `/proc` when scraped (zeros
//! where `/proc` is not there).

use std::fs;

pub struct Sample {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
}

/// Clock ticks per second of `/proc/self/stat`'s times: 100 on every Linux platform Rust
/// targets (USER_HZ), which keeps libc out.
const TICKS_PER_SECOND: u64 = 100;

pub fn sample() -> Sample {
    Sample {
        cpu_seconds: cpu_ticks().unwrap_or(0) as f64 / TICKS_PER_SECOND as f64,
        rss_bytes: rss_kib().unwrap_or(0).saturating_mul(1024),
        open_fds: fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
    }
}

fn cpu_ticks() -> Option<u64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces and parentheses: fields are counted after its last ')'.
    let rest = stat.get(stat.rfind(')')?.checked_add(1)?..)?;
    let mut fields = rest.split_whitespace().skip(11); // state is field 3; utime is field 14
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

fn rss_kib() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_has_memory_and_descriptors() {
        let s = super::sample();
        assert!(s.rss_bytes > 0);
        assert!(s.open_fds > 0);
    }
}
