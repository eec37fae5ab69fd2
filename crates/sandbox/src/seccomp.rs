//! The seccomp filter every function process runs under: everything is allowed except what a
//! function has no business doing, which fails with EPERM (a clear error, not a kill). Close
//! to Docker's default profile in spirit, as a deny list so that runtimes keep working as
//! they do on the host.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The syscalls refused, by name (x86_64 and aarch64 names; missing ones are skipped).
pub const DENIED: &[&str] = &[
    // Mounts and namespaces.
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    // Looking into or controlling other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    // Kernel modules, kexec, reboot, swap, accounting, quotas, syslog.
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "syslog",
    // Keyrings.
    "add_key",
    "request_key",
    "keyctl",
    // Clocks, host identity, raw I/O.
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "sethostname",
    "setdomainname",
    "iopl",
    "ioperm",
    // Kernel attack surface a function does not need.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "lookup_dcookie",
    "vhangup",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "personality",
];

fn arch() -> Option<TargetArch> {
    match std::env::consts::ARCH {
        "x86_64" => Some(TargetArch::x86_64),
        "aarch64" => Some(TargetArch::aarch64),
        _ => None,
    }
}

fn number(name: &str) -> Option<i64> {
    #[cfg(target_arch = "x86_64")]
    let n = match name {
        "mount" => libc::SYS_mount,
        "umount2" => libc::SYS_umount2,
        "pivot_root" => libc::SYS_pivot_root,
        "chroot" => libc::SYS_chroot,
        "setns" => libc::SYS_setns,
        "unshare" => libc::SYS_unshare,
        "fsopen" => libc::SYS_fsopen,
        "fsconfig" => libc::SYS_fsconfig,
        "fsmount" => libc::SYS_fsmount,
        "fspick" => libc::SYS_fspick,
        "move_mount" => libc::SYS_move_mount,
        "open_tree" => libc::SYS_open_tree,
        "mount_setattr" => libc::SYS_mount_setattr,
        "ptrace" => libc::SYS_ptrace,
        "process_vm_readv" => libc::SYS_process_vm_readv,
        "process_vm_writev" => libc::SYS_process_vm_writev,
        "kcmp" => libc::SYS_kcmp,
        "pidfd_getfd" => libc::SYS_pidfd_getfd,
        "init_module" => libc::SYS_init_module,
        "finit_module" => libc::SYS_finit_module,
        "delete_module" => libc::SYS_delete_module,
        "kexec_load" => libc::SYS_kexec_load,
        "kexec_file_load" => libc::SYS_kexec_file_load,
        "reboot" => libc::SYS_reboot,
        "swapon" => libc::SYS_swapon,
        "swapoff" => libc::SYS_swapoff,
        "acct" => libc::SYS_acct,
        "quotactl" => libc::SYS_quotactl,
        "syslog" => libc::SYS_syslog,
        "add_key" => libc::SYS_add_key,
        "request_key" => libc::SYS_request_key,
        "keyctl" => libc::SYS_keyctl,
        "settimeofday" => libc::SYS_settimeofday,
        "clock_settime" => libc::SYS_clock_settime,
        "clock_adjtime" => libc::SYS_clock_adjtime,
        "adjtimex" => libc::SYS_adjtimex,
        "sethostname" => libc::SYS_sethostname,
        "setdomainname" => libc::SYS_setdomainname,
        "iopl" => libc::SYS_iopl,
        "ioperm" => libc::SYS_ioperm,
        "bpf" => libc::SYS_bpf,
        "perf_event_open" => libc::SYS_perf_event_open,
        "userfaultfd" => libc::SYS_userfaultfd,
        "open_by_handle_at" => libc::SYS_open_by_handle_at,
        "name_to_handle_at" => libc::SYS_name_to_handle_at,
        "lookup_dcookie" => libc::SYS_lookup_dcookie,
        "vhangup" => libc::SYS_vhangup,
        "io_uring_setup" => libc::SYS_io_uring_setup,
        "io_uring_enter" => libc::SYS_io_uring_enter,
        "io_uring_register" => libc::SYS_io_uring_register,
        "personality" => libc::SYS_personality,
        _ => return None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let n: libc::c_long = {
        let _ = name;
        return None;
    };
    Some(n)
}

/// clone(2) flags that create namespaces: refused, so a function cannot build itself a user
/// namespace with capabilities in it.
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    0x80, // CLONE_NEWTIME
];

/// How many of [`DENIED`] this architecture's filter refuses.
pub fn denied_count() -> usize {
    DENIED.iter().filter(|n| number(n).is_some()).count()
}

/// Compiles the filters for this architecture: the deny list (EPERM), and clone3 answered
/// with ENOSYS (its flags live in memory a filter cannot read; libc falls back to clone,
/// whose flags the first filter checks).
pub fn filters() -> Result<Vec<BpfProgram>, String> {
    use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
    let err = |e: &dyn std::fmt::Display| format!("seccomp: {e}");
    let arch = arch()
        .filter(|_| cfg!(target_arch = "x86_64"))
        .ok_or_else(|| {
            format!(
                "seccomp: no syscall table for {} yet (x86_64 only)",
                std::env::consts::ARCH
            )
        })?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter_map(|n| number(n))
        .map(|n| (n, vec![]))
        .collect();
    let mut clone_rules = Vec::new();
    for flag in NAMESPACE_FLAGS {
        let cond = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(*flag),
            *flag,
        )
        .map_err(|e| err(&e))?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(|e| err(&e))?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    let clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| err(&e))?;
    Ok(vec![
        x32_filter(),
        BpfProgram::try_from(deny).map_err(|e| err(&e))?,
        BpfProgram::try_from(clone3).map_err(|e| err(&e))?,
    ])
}

/// Refuses the x32 ABI (syscall numbers with bit 30 set), which the x86_64 tables do not
/// cover: `unshare` called as an x32 syscall would otherwise pass.
fn x32_filter() -> BpfProgram {
    use seccompiler::sock_filter;
    const X32_BIT: u32 = 0x4000_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const RET_ALLOW: u32 = 0x7fff_0000;
    let ins = |code: u16, jt: u8, jf: u8, k: u32| sock_filter { code, jt, jf, k };
    vec![
        // Load the syscall number (offset 0 of seccomp_data).
        ins((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0, 0, 0),
        ins(
            (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16,
            0,
            1,
            X32_BIT,
        ),
        ins(
            (libc::BPF_RET | libc::BPF_K) as u16,
            0,
            0,
            RET_ERRNO | libc::EPERM as u32,
        ),
        ins((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, RET_ALLOW),
    ]
}

/// Installs the filters on the calling thread (needs no_new_privs or CAP_SYS_ADMIN).
pub fn install(progs: &[BpfProgram]) -> Result<(), String> {
    for p in progs {
        seccompiler::apply_filter(p).map_err(|e| format!("seccomp: {e}"))?;
    }
    Ok(())
}
