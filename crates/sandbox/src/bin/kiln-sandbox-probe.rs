//! A builder that attempts one thing a sandboxed build must not be able to do (or
//! reports one fact about its surroundings) and prints the outcome, so that the
//! sandbox's security tests can run real attacks inside real sandboxes.
//!
//! Every command prints lines of the form `<name> ok [detail]` or
//! `<name> err <errno>`; the tests decide what counts as blocked.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn report(name: &str, rc: i64) {
    if rc < 0 {
        println!("{name} err {}", errno());
    } else {
        println!("{name} ok {rc}");
    }
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn mode(s: &str) -> u32 {
    u32::from_str_radix(s, 8).expect("octal mode")
}

/// Copies `s` (NUL-terminated) into memory below 4 GiB, for i386 system calls.
fn low_string(s: &str) -> *mut u8 {
    // SAFETY: anonymous mapping, written only within its length.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        ) as *mut u8;
        assert!(p as usize != usize::MAX && (p as usize) < (1 << 32));
        std::ptr::copy_nonoverlapping(s.as_ptr(), p, s.len());
        *p.add(s.len()) = 0;
        p
    }
}

/// A system call through the i386 ABI (`int 0x80`) from 64-bit code.
fn syscall_i386(nr: u32, a: u32, b: u32, c: u32) -> i64 {
    syscall_i386_5(nr, a, b, c, 0, 0)
}

fn syscall_i386_5(nr: u32, a: u32, b: u32, c: u32, d: u32, e: u32) -> i64 {
    let ret: u32;
    // SAFETY: int 0x80 with pointer arguments below 4 GiB; clobbers only the
    // registers declared.
    unsafe {
        std::arch::asm!(
            "push rbx",
            "mov ebx, {a:e}",
            "int 0x80",
            "pop rbx",
            a = in(reg) a,
            inlateout("eax") nr => ret,
            in("ecx") b,
            in("edx") c,
            in("esi") d,
            in("edi") e,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
        );
    }
    let r = ret as i32;
    if r < 0 && r > -4096 {
        // SAFETY: setting errno for report().
        unsafe { *libc::__errno_location() = -r };
        -1
    } else {
        i64::from(r)
    }
}

fn stat_mode(path: &str) -> u32 {
    let p = c(path);
    // SAFETY: st written by the kernel.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(p.as_ptr(), &mut st) != 0 {
            return u32::MAX;
        }
        st.st_mode & 0o7777
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let cmd = args[i].as_str();
        let arg = |k: usize| args.get(i + k).map(String::as_str).unwrap_or("");
        let used = run(cmd, arg(1), arg(2));
        i += 1 + used;
    }
    let _ = std::io::stdout().flush();
}

/// Runs one command; returns how many arguments it used.
fn run(cmd: &str, a1: &str, a2: &str) -> usize {
    // SAFETY (whole function): direct system calls with valid arguments; the
    // point of this program is to make them.
    unsafe {
        match cmd {
            "chmod" => {
                report(cmd, i64::from(libc::chmod(c(a1).as_ptr(), mode(a2))));
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "fchmod" => {
                let fd = libc::open(c(a1).as_ptr(), libc::O_RDONLY);
                report(cmd, i64::from(libc::fchmod(fd, mode(a2))));
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "fchmodat" => {
                report(
                    cmd,
                    i64::from(libc::fchmodat(libc::AT_FDCWD, c(a1).as_ptr(), mode(a2), 0)),
                );
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "fchmodat2" => {
                report(
                    cmd,
                    libc::syscall(452, libc::AT_FDCWD, c(a1).as_ptr(), mode(a2), 0),
                );
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "chmod-x32" => {
                report(
                    cmd,
                    libc::syscall(0x4000_0000 + 90, c(a1).as_ptr(), mode(a2)),
                );
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "chmod-i386" | "fchmodat-i386" | "fchmodat2-i386" | "fchmod-i386" => {
                let p = low_string(a1) as u32;
                let rc = match cmd {
                    "chmod-i386" => syscall_i386(15, p, mode(a2), 0),
                    "fchmodat-i386" => syscall_i386(306, libc::AT_FDCWD as u32, p, mode(a2)),
                    "fchmodat2-i386" => syscall_i386(452, libc::AT_FDCWD as u32, p, mode(a2)),
                    _ => {
                        let fd = libc::open(c(a1).as_ptr(), libc::O_RDONLY);
                        syscall_i386(94, fd as u32, mode(a2), 0)
                    }
                };
                report(cmd, rc);
                println!("mode {:o}", stat_mode(a1));
                2
            }
            "getpid-i386" => {
                report(cmd, syscall_i386(20, 0, 0, 0));
                0
            }
            "setxattr" | "setacl" | "setcap" | "setxattr-i386" => {
                let (name, value): (&str, Vec<u8>) = match cmd {
                    "setacl" => (
                        "system.posix_acl_access",
                        // version 2; user_obj rwx, user 0 rwx, group_obj r, mask rwx, other r
                        [
                            2u32.to_le_bytes().to_vec(),
                            acl_entry(0x01, 7, u32::MAX),
                            acl_entry(0x02, 7, 0),
                            acl_entry(0x04, 4, u32::MAX),
                            acl_entry(0x10, 7, u32::MAX),
                            acl_entry(0x20, 4, u32::MAX),
                        ]
                        .concat(),
                    ),
                    "setcap" => ("security.capability", {
                        // VFS_CAP_REVISION_2 with CAP_SETUID permitted+effective
                        let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
                        v.extend(1u32.wrapping_shl(7).to_le_bytes());
                        v.extend([0u8; 12]);
                        v
                    }),
                    _ => ("user.kiln", b"x".to_vec()),
                };
                let rc = if cmd == "setxattr-i386" {
                    let p = low_string(a1) as u32;
                    let n = low_string(name) as u32;
                    let v = low_string("x") as u32;
                    syscall_i386_5(226, p, n, v, 1, 0)
                } else {
                    libc::setxattr(
                        c(a1).as_ptr(),
                        c(name).as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    ) as i64
                };
                report(cmd, rc);
                1
            }
            "getxattr" => {
                let mut buf = [0u8; 64];
                report(
                    cmd,
                    libc::getxattr(
                        c(a1).as_ptr(),
                        c("user.kiln").as_ptr(),
                        buf.as_mut_ptr().cast(),
                        64,
                    ) as i64,
                );
                1
            }
            "write" => {
                let fd = libc::open(
                    c(a1).as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                    0o644,
                );
                if fd < 0 {
                    report(cmd, -1);
                } else {
                    report(cmd, libc::write(fd, b"pwned\n".as_ptr().cast(), 6) as i64);
                }
                1
            }
            "read" => {
                match std::fs::read(a1) {
                    Ok(v) => println!("read ok {}", v.len()),
                    Err(e) => println!("read err {}", e.raw_os_error().unwrap_or(0)),
                }
                1
            }
            "cat" => {
                match std::fs::read_to_string(a1) {
                    Ok(v) => print!("{v}"),
                    Err(e) => println!("cat err {}", e.raw_os_error().unwrap_or(0)),
                }
                1
            }
            "ls" => {
                match std::fs::read_dir(a1) {
                    Ok(d) => {
                        let mut names: Vec<String> = d
                            .filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect();
                        names.sort();
                        println!("ls ok {}", names.join(" "));
                    }
                    Err(e) => println!("ls err {}", e.raw_os_error().unwrap_or(0)),
                }
                1
            }
            "exists" => {
                println!(
                    "exists {}",
                    std::path::Path::new(a1).symlink_metadata().is_ok()
                );
                1
            }
            "tcp" => {
                // A port on the loopback, or any address and port.
                let addr = if a1.contains(':') {
                    a1.to_string()
                } else {
                    format!("127.0.0.1:{a1}")
                };
                let r = std::net::TcpStream::connect_timeout(
                    &addr.parse().unwrap(),
                    Duration::from_secs(2),
                );
                match r {
                    Ok(mut s) => {
                        let mut buf = String::new();
                        let _ = s.read_to_string(&mut buf);
                        println!("tcp ok {}", buf.trim());
                    }
                    Err(e) => println!("tcp err {}", e.raw_os_error().unwrap_or(0)),
                }
                1
            }
            "unix-abstract" => {
                let fd = connect_abstract(a1);
                report(cmd, i64::from(fd));
                if fd >= 0 {
                    let mut s = std::fs::File::from_raw_fd(fd);
                    let mut buf = String::new();
                    let _ = s.read_to_string(&mut buf);
                    println!("unix-abstract got {}", buf.trim());
                }
                1
            }
            "mknod" => {
                report(
                    cmd,
                    i64::from(libc::mknod(
                        c(a1).as_ptr(),
                        libc::S_IFCHR | 0o666,
                        libc::makedev(1, 3),
                    )),
                );
                1
            }
            "mknod-fifo" => {
                report(
                    cmd,
                    i64::from(libc::mknod(c(a1).as_ptr(), libc::S_IFIFO | 0o666, 0)),
                );
                1
            }
            "mount" => {
                report(
                    cmd,
                    i64::from(libc::mount(
                        c("none").as_ptr(),
                        c(a1).as_ptr(),
                        c("tmpfs").as_ptr(),
                        0,
                        std::ptr::null(),
                    )),
                );
                1
            }
            "remount-rw" => {
                report(
                    cmd,
                    i64::from(libc::mount(
                        std::ptr::null(),
                        c(a1).as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND,
                        std::ptr::null(),
                    )),
                );
                1
            }
            "ptrace" => {
                let pid: i32 = a1.parse().unwrap();
                report(cmd, libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0));
                report("kill", i64::from(libc::kill(pid, 0)));
                1
            }
            "unshare" => {
                let rc = libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS);
                report(cmd, i64::from(rc));
                if rc == 0 {
                    // Now "root" in a nested namespace: try to use it.
                    let uid = 0;
                    let _ = std::fs::write("/proc/self/setgroups", "deny");
                    let map = std::fs::write("/proc/self/uid_map", format!("0 {} 1", 1000 + uid));
                    println!("uid_map {}", if map.is_ok() { "ok" } else { "err" });
                }
                0
            }
            "init_module" => {
                report(
                    cmd,
                    libc::syscall(
                        libc::SYS_init_module,
                        [0u8; 16].as_ptr(),
                        16usize,
                        c("").as_ptr(),
                    ),
                );
                report(
                    "finit_module",
                    libc::syscall(libc::SYS_finit_module, 0, c("").as_ptr(), 0),
                );
                0
            }
            "sethostname" => {
                report(
                    cmd,
                    i64::from(libc::sethostname(a1.as_ptr().cast(), a1.len())),
                );
                1
            }
            "netns" => {
                let ns = std::fs::read_link("/proc/self/ns/net").unwrap();
                println!("netns {}", ns.display());
                0
            }
            "hostname" => {
                let mut u: libc::utsname = std::mem::zeroed();
                libc::uname(&mut u);
                let n = std::ffi::CStr::from_ptr(u.nodename.as_ptr());
                println!("hostname {}", n.to_string_lossy());
                0
            }
            "pids" => {
                let mut pids: Vec<u32> = std::fs::read_dir("/proc")
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                pids.sort();
                println!("pids {pids:?}");
                0
            }
            "msgget" => {
                let key: i32 = a1.parse().unwrap();
                report(cmd, i64::from(libc::msgget(key, 0)));
                1
            }
            "id" => {
                println!(
                    "id {} {} {} {}",
                    libc::getuid(),
                    libc::getgid(),
                    libc::geteuid(),
                    libc::getegid()
                );
                let mut groups = [0u32; 64];
                let n = libc::getgroups(64, groups.as_mut_ptr());
                println!("groups {:?}", &groups[..n.max(0) as usize]);
                0
            }
            "status" => {
                let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                for l in s.lines() {
                    if l.starts_with("Cap")
                        || l.starts_with("NoNewPrivs")
                        || l.starts_with("Seccomp")
                        || l.starts_with("Sig")
                        || l.starts_with("Umask")
                    {
                        println!("{l}");
                    }
                }
                let mut lim: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
                println!("core {} {}", lim.rlim_cur, lim.rlim_max);
                0
            }
            "daemon" => {
                // Double fork and setsid: the classic way to outlive a build.
                let path = a1.to_owned();
                let delay: u64 = a2.parse().unwrap();
                if libc::fork() == 0 {
                    libc::setsid();
                    if libc::fork() == 0 {
                        std::thread::sleep(Duration::from_millis(delay));
                        let _ = std::fs::write(&path, "daemon was here\n");
                        libc::_exit(0);
                    }
                    libc::_exit(0);
                }
                let mut st = 0;
                libc::wait(&mut st);
                println!("daemon started");
                2
            }
            "fd-send" => {
                // Open our output for writing and hand the descriptor to whoever
                // connects to the abstract socket `a1` (CVE-2024-27297).
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(a2)
                    .unwrap();
                (&file).write_all(b"good\n").unwrap();
                offer_fd(a1, file.as_raw_fd());
                2
            }
            "dir-send" => {
                // Hand a descriptor of directory `a2` to whoever connects to
                // the abstract socket `a1` (CVE-2025-46416).
                let dir = libc::open(c(a2).as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY);
                report("open", i64::from(dir));
                offer_fd(a1, dir);
                2
            }
            "dir-plant" => {
                // Take a directory descriptor from the abstract socket `a1`,
                // then keep creating `a2` in that directory for 20 s.
                let fd = connect_abstract_retrying(a1);
                report("connect", i64::from(fd));
                let dir = recv_fd(fd);
                report("recvfd", i64::from(dir));
                println!("waiting");
                let _ = std::io::stdout().flush();
                for _ in 0..4000 {
                    let f =
                        libc::openat(dir, c(a2).as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o644);
                    if f >= 0 {
                        libc::close(f);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                2
            }
            "fd-recv" => {
                let fd = connect_abstract_retrying(a1);
                report("connect", i64::from(fd));
                let got = recv_fd(fd);
                report("recvfd", i64::from(got));
                println!("waiting");
                let _ = std::io::stdout().flush();
                // Rewrite only once the test says the sender's build is over.
                for _ in 0..6000 {
                    if std::path::Path::new(a2).exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let rc = libc::pwrite(got, b"evil\n".as_ptr().cast(), 5, 0);
                report("rewrite", rc as i64);
                2
            }
            "symlink" => {
                report(
                    cmd,
                    i64::from(libc::symlink(c(a1).as_ptr(), c(a2).as_ptr())),
                );
                2
            }
            "mkdir" => {
                report(cmd, i64::from(libc::mkdir(c(a1).as_ptr(), 0o777)));
                1
            }
            "chmod-plain" => {
                report(cmd, i64::from(libc::chmod(c(a1).as_ptr(), mode(a2))));
                2
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(a1.parse().unwrap()));
                1
            }
            "echo" => {
                println!("{a1}");
                eprintln!("err:{a1}");
                1
            }
            "env" => {
                for (k, v) in std::env::vars() {
                    println!("env {k}={v}");
                }
                println!(
                    "cwd {}",
                    std::env::current_dir()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
                0
            }
            "tty" => {
                println!("tty {}", libc::isatty(1));
                0
            }
            "exit" => {
                let _ = std::io::stdout().flush();
                libc::_exit(a1.parse().unwrap());
            }
            "true" => 0,
            other => {
                println!("unknown command {other}");
                0
            }
        }
    }
}

fn acl_entry(tag: u16, perm: u16, id: u32) -> Vec<u8> {
    let mut v = tag.to_le_bytes().to_vec();
    v.extend(perm.to_le_bytes());
    v.extend(id.to_le_bytes());
    v
}

fn abstract_addr(name: &str) -> (libc::sockaddr_un, u32) {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (i, b) in name.bytes().enumerate() {
        addr.sun_path[i + 1] = b as i8;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + 1 + name.len()) as u32;
    (addr, len)
}

/// Hands `fd` to the first process that connects to the abstract socket
/// `name`.
fn offer_fd(name: &str, fd: i32) {
    let listener = listen_abstract(name);
    // SAFETY: accept on a listening socket, without the peer's address.
    let conn = unsafe {
        libc::accept(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    };
    report("accept", i64::from(conn));
    report("sendfd", send_fd(conn, fd));
}

/// [`connect_abstract`], tried for 2 s while nobody listens yet.
fn connect_abstract_retrying(name: &str) -> i32 {
    let mut fd = -1;
    for _ in 0..200 {
        fd = connect_abstract(name);
        if fd >= 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    fd
}

fn connect_abstract(name: &str) -> i32 {
    let (addr, len) = abstract_addr(name);
    // SAFETY: socket + connect with a valid address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) != 0 {
            let e = errno();
            libc::close(fd);
            *libc::__errno_location() = e;
            return -1;
        }
        fd
    }
}

fn listen_abstract(name: &str) -> OwnedFd {
    let (addr, len) = abstract_addr(name);
    // SAFETY: socket + bind + listen with a valid address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        assert_eq!(
            libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len),
            0,
            "bind"
        );
        assert_eq!(libc::listen(fd, 1), 0);
        OwnedFd::from_raw_fd(fd)
    }
}

fn send_fd(sock: i32, fd: i32) -> i64 {
    // SAFETY: a one-byte message with one SCM_RIGHTS descriptor.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u8; 64];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut i32, fd);
        libc::sendmsg(sock, &msg, 0) as i64
    }
}

fn recv_fd(sock: i32) -> i32 {
    // SAFETY: receives a one-byte message with one SCM_RIGHTS descriptor.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cbuf = [0u8; 64];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.len();
        if libc::recvmsg(sock, &mut msg, 0) < 0 {
            return -1;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return -1;
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const i32)
    }
}
