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
//! audit arch kills the process.
//!
//! It is one classic BPF program, assembled here from a table of the calls it
//! judges. The kernel checks, translates and JITs every program it is given, then
//! runs it against every system-call number to cache the ones it always allows,
//! with interrupts off, once per sandbox: one program of about 70 instructions
//! costs a fraction of what a program per (arch, verdict) did.

use std::sync::OnceLock;

use libc::sock_filter;

const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// The system calls one ABI's part of the filter judges.
struct Abi {
    arch: u32,
    /// chmod-like calls, with the index of their mode argument.
    chmods: &'static [(u32, u32)],
    /// setxattr … fremovexattr, then setxattrat … removexattrat (Linux 6.13+).
    xattrs: &'static [u32],
    io_uring_setup: u32,
}

/// Native x86-64; x32 calls are judged by the same numbers once bit 30 is cleared
/// (the calls here have the same numbers in both).
const X86_64: Abi = Abi {
    arch: AUDIT_ARCH_X86_64,
    chmods: &[(90, 1), (91, 1), (268, 2), (452, 2)],
    xattrs: &[
        188, 189, 190, 191, 192, 193, 194, 195, 196, 197, 198, 199, 463, 464, 465, 466,
    ],
    io_uring_setup: 425,
};

const I386: Abi = Abi {
    arch: AUDIT_ARCH_I386,
    chmods: &[(15, 1), (94, 1), (306, 2), (452, 2)],
    xattrs: &[
        226, 227, 228, 229, 230, 231, 232, 233, 234, 235, 236, 237, 463, 464, 465, 466,
    ],
    io_uring_setup: 425,
};

/// The program, assembled once per process.
pub fn filter() -> &'static [sock_filter] {
    static FILTER: OnceLock<Vec<sock_filter>> = OnceLock::new();
    FILTER.get_or_init(assemble)
}

// Offsets into `struct seccomp_data`, and the low half of an argument (x86 is
// little-endian; modes are 32-bit in every ABI).
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(index: u32) -> u32 {
    16 + 8 * index
}

const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_AND: u16 = 0x50;
const BPF_JEQ: u16 = 0x10;
const BPF_JSET: u16 = 0x40;
const BPF_K: u16 = 0x00;

/// Where a jump goes: the next instruction, or a labelled one further on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Next,
    To(Label),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Label {
    X86,
    I386,
    Allow,
    Eperm,
    Enotsup,
    Enosys,
    /// The mode check of a chmod-like call, per ABI and argument index.
    Mode(u32, u32),
}

enum Insn {
    Mark(Label),
    Stmt(u16, u32),
    Jump(u16, u32, Target, Target),
}

fn jeq(k: u32, to: Label) -> Insn {
    Insn::Jump(BPF_JMP | BPF_JEQ | BPF_K, k, Target::To(to), Target::Next)
}

fn ret(k: u32) -> Insn {
    Insn::Stmt(BPF_RET | BPF_K, k)
}

fn source() -> Vec<Insn> {
    use Insn::{Jump, Mark, Stmt};
    let mut p = vec![
        Stmt(BPF_LD | BPF_W | BPF_ABS, ARCH),
        jeq(AUDIT_ARCH_X86_64, Label::X86),
        jeq(AUDIT_ARCH_I386, Label::I386),
        ret(libc::SECCOMP_RET_KILL_PROCESS),
    ];
    for (abi, label) in [(&X86_64, Label::X86), (&I386, Label::I386)] {
        p.push(Mark(label));
        p.push(Stmt(BPF_LD | BPF_W | BPF_ABS, NR));
        if abi.arch == AUDIT_ARCH_X86_64 {
            p.push(Stmt(BPF_ALU | BPF_AND | BPF_K, !X32_SYSCALL_BIT));
        }
        for &(nr, arg) in abi.chmods {
            p.push(jeq(nr, Label::Mode(abi.arch, arg)));
        }
        for &nr in abi.xattrs {
            p.push(jeq(nr, Label::Enotsup));
        }
        p.push(jeq(abi.io_uring_setup, Label::Enosys));
        p.push(ret(libc::SECCOMP_RET_ALLOW));
        let mut args: Vec<u32> = abi.chmods.iter().map(|&(_, arg)| arg).collect();
        args.sort_unstable();
        args.dedup();
        for arg in args {
            p.push(Mark(Label::Mode(abi.arch, arg)));
            p.push(Stmt(BPF_LD | BPF_W | BPF_ABS, arg_low(arg)));
            p.push(Jump(
                BPF_JMP | BPF_JSET | BPF_K,
                libc::S_ISUID | libc::S_ISGID,
                Target::To(Label::Eperm),
                Target::To(Label::Allow),
            ));
        }
    }
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | e as u32;
    p.extend([
        Mark(Label::Eperm),
        ret(errno(libc::EPERM)),
        Mark(Label::Enotsup),
        ret(errno(libc::ENOTSUP)),
        Mark(Label::Enosys),
        ret(errno(libc::ENOSYS)),
        Mark(Label::Allow),
        ret(libc::SECCOMP_RET_ALLOW),
    ]);
    p
}

/// Resolves labels into the forward offsets classic BPF jumps take.
fn assemble() -> Vec<sock_filter> {
    let source = source();
    let mut at = Vec::new();
    let mut pc = 0;
    for insn in &source {
        match insn {
            Insn::Mark(label) => at.push((*label, pc)),
            _ => pc += 1,
        }
    }
    let offset = |from: usize, target: Target| -> u8 {
        match target {
            Target::Next => 0,
            Target::To(label) => {
                let &(_, to) = at
                    .iter()
                    .find(|(l, _)| *l == label)
                    .unwrap_or_else(|| panic!("seccomp: no {label:?} in the filter"));
                u8::try_from(to - from - 1).expect("seccomp: jumps are forward and short")
            }
        }
    };
    let mut out = Vec::with_capacity(pc);
    for insn in &source {
        let (code, k, jt, jf) = match *insn {
            Insn::Mark(_) => continue,
            Insn::Stmt(code, k) => (code, k, 0, 0),
            Insn::Jump(code, k, t, f) => (code, k, offset(out.len(), t), offset(out.len(), f)),
        };
        out.push(sock_filter { code, jt, jf, k });
    }
    out
}

/// Installs the filter on the calling thread. Sets `no_new_privs` first (the
/// kernel requires it of unprivileged callers). Async-signal-safe: it only makes
/// system calls on memory prepared before.
pub(crate) fn install(filter: &[sock_filter]) -> Result<(), i32> {
    // SAFETY: plain prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(errno());
    }
    let fprog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut sock_filter,
    };
    // SAFETY: the kernel copies the program; `fprog` and `filter` outlive the call.
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
    Ok(())
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program as the kernel would, for the instructions it uses.
    fn run(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut a, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let k = i.k as usize;
                    a = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                c if c == BPF_ALU | BPF_AND | BPF_K => a &= i.k,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf })
                }
                c if c == BPF_JMP | BPF_JSET | BPF_K => {
                    pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf })
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c => panic!("instruction {c:#x} not emulated"),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOTSUP: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOTSUP as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

    /// What the filter must answer for a call whose every argument is `arg`.
    fn expected(abi: &Abi, nr: u32, arg: u64) -> u32 {
        if abi.chmods.iter().any(|&(n, _)| n == nr) {
            let special = u64::from(libc::S_ISUID | libc::S_ISGID);
            return if arg & special != 0 { EPERM } else { ALLOW };
        }
        if abi.xattrs.contains(&nr) {
            return ENOTSUP;
        }
        if nr == abi.io_uring_setup {
            return ENOSYS;
        }
        ALLOW
    }

    #[test]
    fn every_call_of_every_abi_gets_its_verdict() {
        let prog = filter();
        assert!(prog.len() < 100, "{} instructions", prog.len());
        for (abi, bits) in [(&X86_64, 0), (&X86_64, X32_SYSCALL_BIT), (&I386, 0)] {
            for nr in 0..1024 {
                for mode in [0o755u64, 0o4755, 0o2755, 0o6000, 0o1777, 0x1_0000_0755] {
                    let got = run(prog, abi.arch, nr | bits, [mode; 6]);
                    let want = expected(abi, nr, mode & 0xffff_ffff);
                    assert_eq!(
                        got,
                        want,
                        "arch {:#x} nr {:#x} mode {mode:#o}",
                        abi.arch,
                        nr | bits
                    );
                }
            }
        }
    }

    #[test]
    fn the_mode_is_read_from_the_right_argument() {
        let prog = filter();
        let mut args = [0o644u64; 6];
        // chmod(path, mode): the setuid bit only in the path pointer is no mode.
        args[0] = 0o4000;
        assert_eq!(run(prog, AUDIT_ARCH_X86_64, 90, args), ALLOW);
        args[1] = 0o4644;
        assert_eq!(run(prog, AUDIT_ARCH_X86_64, 90, args), EPERM);
        // fchmodat(dirfd, path, mode): the mode is the third.
        assert_eq!(run(prog, AUDIT_ARCH_X86_64, 268, args), ALLOW);
        args[2] = 0o2644;
        assert_eq!(run(prog, AUDIT_ARCH_X86_64, 268, args), EPERM);
        assert_eq!(run(prog, AUDIT_ARCH_I386, 306, args), EPERM);
    }

    #[test]
    fn unknown_arches_are_killed() {
        let prog = filter();
        for arch in [0, 0xC000_00B7 /* aarch64 */, AUDIT_ARCH_X86_64 ^ 1] {
            assert_eq!(run(prog, arch, 39, [0; 6]), libc::SECCOMP_RET_KILL_PROCESS);
        }
    }
}
