//! The few system calls init makes once the builder runs, made without glibc.
//!
//! Init shares the caller's memory (`CLONE_VM`) but not its thread: its thread
//! pointer is still the spawning thread's. glibc's wrappers use that pointer
//! (to set `errno`, to check cancellation in `waitpid`), and once the builder
//! has started the spawning thread may exit and its thread block be freed or
//! handed to a new thread. These wrappers return `-errno` instead, and touch
//! nothing but their arguments.

#[cfg(target_arch = "x86_64")]
unsafe fn syscall4(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `nr`; the
    // kernel clobbers only rcx and r11.
    unsafe {
        core::arch::asm!(
            "syscall",
            inlateout("rax") nr as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(target_arch = "aarch64")]
unsafe fn syscall4(nr: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the caller passes arguments valid for system call `nr`.
    unsafe {
        core::arch::asm!(
            "svc 0",
            in("x8") nr,
            inlateout("x0") a as isize => ret,
            in("x1") b,
            in("x2") c,
            in("x3") d,
            options(nostack),
        );
    }
    ret
}

/// `wait4(-1, status, 0, NULL)`: the pid reaped, or `-errno`.
pub(crate) fn wait_any(status: &mut i32) -> isize {
    // SAFETY: `status` is a valid, writable i32.
    unsafe {
        syscall4(
            libc::SYS_wait4,
            usize::MAX,
            status as *mut i32 as usize,
            0,
            0,
        )
    }
}

/// `write(fd, buf)`: bytes written, or `-errno`.
pub(crate) fn write(fd: i32, buf: &[u8]) -> isize {
    // SAFETY: `buf` is valid for reads of its length.
    unsafe {
        syscall4(
            libc::SYS_write,
            fd as usize,
            buf.as_ptr() as usize,
            buf.len(),
            0,
        )
    }
}

/// `close_range(first, last, 0)`.
pub(crate) fn close_range(first: u32, last: u32) -> isize {
    // SAFETY: closing descriptors of this process only.
    unsafe { syscall4(libc::SYS_close_range, first as usize, last as usize, 0, 0) }
}

/// `exit_group(code)`: ends this process (init has a thread group of its own).
pub(crate) fn exit(code: i32) -> ! {
    // SAFETY: exit_group ends the process; it does not return.
    unsafe {
        syscall4(libc::SYS_exit_group, code as usize, 0, 0, 0);
        core::hint::unreachable_unchecked()
    }
}
