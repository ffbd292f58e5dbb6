//! Host memory: what the machine and the process's container (cgroup v2 or v1) let it use, and
//! the process's resident size and peak. In a container `MemAvailable` is the node's, not the
//! container's: a pod with a 6 GiB limit on a 256 GB node would see 250 GB available and be
//! killed by the kernel at 6 GiB. Every figure here is the smaller of the two.

use std::path::{Path, PathBuf};

/// A `Key:   123 kB` line of /proc/meminfo or /proc/self/status, in bytes.
pub fn kb_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.split(':').next() == Some(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// A cgroup limit file: `max` (v2) or a page-rounded 2⁶³ (v1) is no limit.
pub fn cgroup_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

/// A `key value` line of a cgroup's memory.stat.
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// The memory cgroup of this process, from /proc/self/cgroup: (v2 path, v1 memory path).
pub fn cgroup_paths(proc_self_cgroup: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for l in proc_self_cgroup.lines() {
        let mut it = l.splitn(3, ':');
        let (id, ctl, path) = (it.next(), it.next(), it.next());
        match (id, ctl, path) {
            (Some("0"), Some(""), Some(p)) => v2 = Some(p.to_string()),
            (_, Some(c), Some(p)) if c.split(',').any(|c| c == "memory") => {
                v1 = Some(p.to_string())
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// What the memory cgroups above this process allow, if any sets a limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CgroupMemory {
    /// The smallest limit of the process's cgroup and its ancestors.
    pub limit: u64,
    /// The least any of them has left: limit less usage without reclaimable page cache.
    pub headroom: u64,
}

/// The memory cgroups of this process (v2 or v1) and their ancestors. Inside a container the
/// cgroup namespace puts its own cgroup at the mount root, so the path from /proc/self/cgroup
/// is tried first and the root after it.
pub fn cgroup_memory() -> Option<CgroupMemory> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let (v2, v1) = cgroup_paths(&own);
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    // The cgroup and its ancestors up to the mount root: any of them may hold the limit.
    let candidates = |root: &str, path: Option<String>| -> Vec<PathBuf> {
        let mut dirs = vec![];
        // A path with `..` (the process outside its cgroup namespace) names nothing here.
        if let Some(p) = path.filter(|p| !p.split('/').any(|c| c == "..")) {
            let mut d = Path::new(root).join(p.trim_start_matches('/'));
            while d.starts_with(root) && d != Path::new(root) {
                dirs.push(d.clone());
                d.pop();
            }
        }
        dirs.push(PathBuf::from(root));
        dirs
    };
    // (mount, cgroup path, limit file, usage file, memory.stat key of reclaimable file cache)
    let hierarchies = [
        (
            "/sys/fs/cgroup",
            v2,
            "memory.max",
            "memory.current",
            "inactive_file",
        ),
        (
            "/sys/fs/cgroup/memory",
            v1,
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        ),
    ];
    let mut best: Option<CgroupMemory> = None;
    for (root, path, limit_file, usage_file, inactive_key) in hierarchies {
        for d in candidates(root, path) {
            let Some(limit) = read(d.join(limit_file)).and_then(|t| cgroup_limit(&t)) else {
                continue;
            };
            let usage: u64 = read(d.join(usage_file))
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            let inactive = read(d.join("memory.stat"))
                .and_then(|t| stat_field(&t, inactive_key))
                .unwrap_or(0);
            let headroom = limit.saturating_sub(usage.saturating_sub(inactive));
            best = Some(match best {
                None => CgroupMemory { limit, headroom },
                Some(b) => CgroupMemory {
                    limit: b.limit.min(limit),
                    headroom: b.headroom.min(headroom),
                },
            });
        }
    }
    best
}

fn meminfo(key: &str) -> Option<u64> {
    kb_field(&std::fs::read_to_string("/proc/meminfo").ok()?, key)
}

/// The most memory this process could ever hold: the machine's, or its container's limit.
pub fn limit() -> Option<u64> {
    let total = meminfo("MemTotal");
    match (total, cgroup_memory().map(|c| c.limit)) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

/// Memory the system can still give this process now: MemAvailable, or what its container's
/// limit leaves, whichever is smaller.
pub fn available() -> Option<u64> {
    let avail = meminfo("MemAvailable");
    let cg = cgroup_memory().map(|c| c.headroom);
    match (avail, cg) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// The process's resident memory now and its peak since start (or since `reset_peak`).
#[derive(Clone, Copy, Debug)]
pub struct Resident {
    pub now: u64,
    pub peak: u64,
}

pub fn resident() -> Option<Resident> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(Resident {
        now: kb_field(&s, "VmRSS")?,
        peak: kb_field(&s, "VmHWM")?,
    })
}

/// Restart the peak (VmHWM) from the current resident size; false where the kernel does not
/// allow it.
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Return the allocator's free pages to the system (glibc keeps what a run freed in its heaps:
/// without this, each run's peak starts from whatever the largest run before it left).
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: glibc's malloc_trim takes no pointer and may be called at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// A size in bytes: a number with an optional unit, as Kubernetes writes them (`6Gi`, `512Mi`,
/// `8G`) or with a `B` (`6GiB`, `8GB`); K/M/G/T are powers of 1000, Ki/Mi/Gi/Ti of 1024.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = || {
        format!("'{s}' is not a size: write bytes or a number with K, M, G, T (x1000) or Ki, Mi, Gi, Ti (x1024), e.g. 6Gi")
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let unit = unit.strip_suffix('B').unwrap_or(unit);
    let mult: f64 = match unit {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = v * mult;
    if !(1.0..1.8e19).contains(&bytes) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_limits_parse() {
        let status = "Name:\tstar-run\nVmHWM:\t  90604 kB\nVmRSS:\t   88836 kB\n";
        assert_eq!(kb_field(status, "VmRSS"), Some(88836 * 1024));
        assert_eq!(kb_field(status, "VmHWM"), Some(90604 * 1024));
        assert_eq!(kb_field(status, "VmSwap"), None);
        assert_eq!(cgroup_limit("max\n"), None);
        assert_eq!(cgroup_limit("9223372036854771712\n"), None);
        assert_eq!(cgroup_limit("6442450944\n"), Some(6 << 30));
        assert_eq!(
            stat_field("active_file 10\ninactive_file 4096\n", "inactive_file"),
            Some(4096)
        );
    }

    #[test]
    fn cgroup_paths_of_v1_v2_and_hybrid() {
        assert_eq!(
            cgroup_paths("0::/kubepods/pod1/c1\n"),
            (Some("/kubepods/pod1/c1".into()), None)
        );
        assert_eq!(
            cgroup_paths("4:memory:/process_api/bf72\n3:cpuset:/\n0::/\n"),
            (Some("/".into()), Some("/process_api/bf72".into()))
        );
        assert_eq!(
            cgroup_paths("5:cpu,memory:/docker/abc\n"),
            (None, Some("/docker/abc".into()))
        );
    }

    #[test]
    fn sizes_parse_in_kubernetes_and_byte_units() {
        assert_eq!(parse_size("6Gi"), Ok(6 << 30));
        assert_eq!(parse_size("6GiB"), Ok(6 << 30));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8_000_000_000));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("123456"), Ok(123456));
        for bad in ["", "G", "-1G", "6 apples", "0", "1e3", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }
}
