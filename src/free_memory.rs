//! How much memory a device has left for this process: a GPU's free memory as its driver reports it; on the CPU,
//! what Linux could still give (`MemAvailable` plus free swap), capped by the memory limit of the process's cgroup
//! (a container's `--memory`, SageMaker's instance), where its page cache, which the kernel reclaims, counts as free.

use candle_core::Device;

/// Bytes `device` can still allocate, or `None` when the platform does not say.
pub fn available(device: &Device) -> Option<u64> {
    if !device.is_cpu() {
        return crate::compute::gpu_memory_info(device).map(|(free, _total)| free);
    }
    let host = host_available(&std::fs::read_to_string("/proc/meminfo").ok()?)?;
    Some(match cgroup_available() {
        Some(limited) => host.min(limited),
        None => host,
    })
}

/// `MemAvailable` + `SwapFree` of `/proc/meminfo`, in bytes.
fn host_available(meminfo: &str) -> Option<u64> {
    let kib = |name: &str| {
        meminfo.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?.trim();
            value.strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some((kib("MemAvailable")? + kib("SwapFree").unwrap_or(0)) * 1024)
}

/// The tightest room left under the memory limits of this process's cgroup and its ancestors (cgroup v2, else v1).
fn cgroup_available() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    if let Some(own) = read("/proc/self/cgroup").as_deref().and_then(cgroup_v2_path) {
        let mut best: Option<u64> = None;
        let mut path = own.trim_end_matches('/').to_string();
        loop {
            let dir = format!("/sys/fs/cgroup{path}");
            if let (Some(max), Some(stat)) = (read(&format!("{dir}/memory.max")), read(&format!("{dir}/memory.stat"))) {
                if let Some(room) = room_under_limit(&max, &stat, "anon") {
                    best = Some(best.map_or(room, |b| b.min(room)));
                }
            }
            match path.rfind('/') {
                Some(cut) if !path.is_empty() => path.truncate(cut),
                _ => break,
            }
        }
        if best.is_some() {
            return best;
        }
    }
    room_under_limit(
        &read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
        &read("/sys/fs/cgroup/memory/memory.stat")?,
        "total_rss",
    )
}

/// The group's path in the unified (v2) hierarchy: the `0::/path` line of `/proc/self/cgroup`.
fn cgroup_v2_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// `limit` (the text of `memory.max` or `memory.limit_in_bytes`; `max` = none) less the group's anonymous memory
/// (the `used` field of its `memory.stat`): its page cache is reclaimable, so it does not count as used.
fn room_under_limit(limit: &str, stat: &str, used: &str) -> Option<u64> {
    let limit: u64 = limit.trim().parse().ok()?;
    let used = stat.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == used).then(|| value.trim().parse::<u64>().ok())?
    })?;
    Some(limit.saturating_sub(used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_counts_available_memory_and_free_swap() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n\
                       SwapTotal:       4096 kB\nSwapFree:        2048 kB\n";
        assert_eq!(host_available(meminfo), Some((20_000_000 + 2048) * 1024));
        assert_eq!(host_available("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn a_cgroup_limit_counts_page_cache_as_free_and_max_as_no_limit() {
        let stat = "anon 3000\nfile 5000\nkernel 10\n";
        assert_eq!(room_under_limit("10000\n", stat, "anon"), Some(7000));
        assert_eq!(room_under_limit("max\n", stat, "anon"), None);
        assert_eq!(room_under_limit("2000\n", stat, "anon"), Some(0));
        assert_eq!(room_under_limit("10000\n", "file 5\n", "anon"), None);
        assert_eq!(
            room_under_limit("9223372036854771712\n", "cache 1\ntotal_rss 100\n", "total_rss"),
            Some(9223372036854771612)
        );
        assert_eq!(
            cgroup_v2_path("12:cpu:/x\n0::/system.slice/docker-1.scope\n"),
            Some("/system.slice/docker-1.scope")
        );
        assert_eq!(cgroup_v2_path("0::/\n"), Some("/"));
    }

    #[test]
    fn the_cpu_reports_some_memory_on_linux() {
        if cfg!(target_os = "linux") {
            let free = available(&Device::Cpu).expect("/proc/meminfo is readable");
            assert!(free > 1 << 20, "{free}");
        }
    }
}
