//! The seccomp filter every sandboxed program runs under.
//!
//! It refuses what a build must never do even inside its namespaces:
//! - setting the setuid or setgid bit through `chmod`, `fchmod`, `fchmodat` or
//!   `fchmodat2` → `EPERM` (a setuid file in the store would outlive the build);
//! - every extended-attribute call (`set/get/list/remove` × path/`l`/`f`/`…at`) →
//!   `ENOTSUP`, so ACLs and file capabilities cannot be attached either, and tools
//!   that copy attributes behave as on a file system without them;
//! - `io_uring_setup` → `ENOSYS`, because io_uring requests (`IORING_OP_SETXATTR`…)
//!   are not seen by seccomp.
//!
//! The rules hold for all three x86-64 system-call ABIs: native, x32 (same audit
//! arch, numbers with bit 30 set) and i386 (`int 0x80`, audit arch `I386`); any other
//! audit arch kills the process. `seccompiler` compiles one arch per filter and kills
//! foreign arches, so each (arch, action) pair is compiled separately, its
//! foreign-arch verdict is turned into "allow", and all filters are installed; the
//! kernel applies the strictest verdict of all of them. A small gate filter of our
//! own kills unknown arches.
//!
//! The compiled programs are built once per process ([`filters`]).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch, sock_filter,
};

/// Why the filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp filter failed: {0}")]
    Compile(String),
    #[error(
        "seccompiler produced an unexpected prologue (expected an arch check); the filter cannot be adapted to the i386 ABI"
    )]
    UnexpectedPrologue,
}

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// (chmod-like call, index of its mode argument) for x86-64 (also x32 after adding
/// the x32 bit).
const CHMOD_X86_64: &[(i64, u8)] = &[(90, 1), (91, 1), (268, 2), (452, 2)];
const CHMOD_I386: &[(i64, u8)] = &[(15, 1), (94, 1), (306, 2), (452, 2)];
/// setxattr … fremovexattr, then setxattrat … removexattrat (Linux 6.13+).
const XATTR_X86_64: &[i64] = &[
    188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 463, 464, 465, 466,
];
const XATTR_I386: &[i64] = &[
    226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 463, 464, 465, 466,
];
const IO_URING_SETUP: i64 = 425;

/// The compiled filters, in installation order.
pub fn filters() -> Result<&'static [BpfProgram], &'static SeccompError> {
    static FILTERS: OnceLock<Result<Vec<BpfProgram>, SeccompError>> = OnceLock::new();
    FILTERS
        .get_or_init(build_filters)
        .as_ref()
        .map(|v| v.as_slice())
}

fn build_filters() -> Result<Vec<BpfProgram>, SeccompError> {
    let mut out = vec![arch_gate()];
    for (arch, offset, chmods, xattrs) in [
        (AUDIT_ARCH_X86_64, 0, CHMOD_X86_64, XATTR_X86_64),
        (AUDIT_ARCH_I386, 0, CHMOD_I386, XATTR_I386),
    ] {
        // Native x86-64 and x32 share the audit arch, so one filter holds both.
        let abis: &[i64] = if arch == AUDIT_ARCH_X86_64 {
            &[0, X32_SYSCALL_BIT]
        } else {
            &[offset]
        };
        let mut chmod_rules = BTreeMap::new();
        let mut xattr_rules = BTreeMap::new();
        let mut uring_rules = BTreeMap::new();
        for &abi in abis {
            for &(nr, mode_arg) in chmods {
                chmod_rules.insert(abi | nr, mode_bit_rules(mode_arg)?);
            }
            for &nr in xattrs {
                xattr_rules.insert(abi | nr, Vec::new());
            }
            uring_rules.insert(abi | IO_URING_SETUP, Vec::new());
        }
        out.push(compile(chmod_rules, libc::EPERM, arch)?);
        out.push(compile(xattr_rules, libc::ENOTSUP, arch)?);
        out.push(compile(uring_rules, libc::ENOSYS, arch)?);
    }
    Ok(out)
}

fn mode_bit_rules(mode_arg: u8) -> Result<Vec<SeccompRule>, SeccompError> {
    [libc::S_ISUID, libc::S_ISGID]
        .into_iter()
        .map(|bit| {
            let cond = SeccompCondition::new(
                mode_arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(u64::from(bit)),
                u64::from(bit),
            )
            .map_err(|e| SeccompError::Compile(e.to_string()))?;
            SeccompRule::new(vec![cond]).map_err(|e| SeccompError::Compile(e.to_string()))
        })
        .collect()
}

/// Compiles rules for x86-64 with `seccompiler`, then retargets the arch check at
/// `arch` and lets every other arch through (the gate and the other filters judge
/// those).
fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    errno: i32,
    arch: u32,
) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Compile(e.to_string()))?;
    let mut prog: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| SeccompError::Compile(e.to_string()))?;
    // Prologue: ld [arch]; jeq AUDIT_ARCH_X86_64, +1, +0; ret KILL_PROCESS.
    let expected = [
        (BPF_LD | BPF_W | BPF_ABS, 4),
        (BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64),
        (BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    if prog.len() < 3
        || prog[..3]
            .iter()
            .zip(expected)
            .any(|(insn, (code, k))| insn.code != code || insn.k != k)
    {
        return Err(SeccompError::UnexpectedPrologue);
    }
    prog[1].k = arch;
    prog[2].k = libc::SECCOMP_RET_ALLOW;
    Ok(prog)
}

const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Kills any process that makes a system call through an ABI other than x86-64,
/// x32 or i386 (none exists on x86-64 kernels today; this keeps it that way).
fn arch_gate() -> BpfProgram {
    vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 2, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_I386, 1, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Installs all filters on the calling thread. Sets `no_new_privs` first (the
/// kernel requires it of unprivileged callers). Async-signal-safe: it only makes
/// system calls on memory prepared before.
pub(crate) fn install(filters: &[BpfProgram]) -> Result<(), i32> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(errno());
    }
    for prog in filters {
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: the kernel copies the program; `fprog` and `prog` outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &fprog as *const libc::sock_fprog,
            )
        };
        if rc != 0 {
            return Err(errno());
        }
    }
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_cover_both_arches() {
        let f = filters().expect("filters compile");
        assert_eq!(f.len(), 7);
        assert_eq!(f[1][1].k, AUDIT_ARCH_X86_64);
        assert_eq!(f[4][1].k, AUDIT_ARCH_I386);
        for prog in &f[1..] {
            assert_eq!(prog[2].k, libc::SECCOMP_RET_ALLOW);
        }
    }
}
