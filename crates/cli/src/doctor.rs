//! `gust doctor`: what isolation and limits functions get on this host, probed for real.

use anyhow::Context;

/// (topic, state and why) lines, the host probe's report preceded by who runs gust.
pub fn report() -> anyhow::Result<Vec<(String, String)>> {
    let exe = std::env::current_exe().context("find the gust executable")?;
    let work = std::env::temp_dir().join(format!("gust-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let host = gust_sandbox::Host::probe_with(exe, &work, Vec::new(), false);
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut out = vec![
        (
            "running as".to_string(),
            if euid == 0 {
                "root".to_string()
            } else {
                format!("uid {euid} (rootless: user namespaces, no cgroup limits)")
            },
        ),
        ("kernel".to_string(), format!("Linux {}", kernel.trim())),
    ];
    out.extend(host.report());
    host.cleanup();
    let _ = std::fs::remove_dir_all(&work);
    Ok(out)
}
