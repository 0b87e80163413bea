//! `cargo xtask vm-image`: the build agent's test machine, from Debian's packages only.
//!
//! The kernel comes from `linux-image-cloud-amd64` (with the few virtio modules
//! it keeps outside the image), the userland is `busybox-static`, and the guest
//! agent is this tree's `build-agent` with the shared libraries it links
//! (from the host's Debian `libc6`). Packages are fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x`: nothing is installed.
//! The result is a machine directory as `kiln_agent::machine` reads it:
//!
//! ```text
//! OUT/default/kiln-test/kiln-test-1.0/{machine.toml,vmlinuz,initrd.cpio,disk.qcow2}
//! OUT/default/kiln-test/kiln-test-1 -> kiln-test-1.0
//! ```
//!
//! The guest boots the initramfs, copies itself to a tmpfs (the sandbox's
//! `pivot_root` cannot leave the initial rootfs), brings up the virtio disk
//! (formatting it on first boot, that is at bootstrap) at `/nix` and the
//! network, runs `build-agent worker`, then syncs and powers off.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process;

#[derive(Debug, clap::Args)]
pub struct VmImageArgs {
    /// The machines directory to write (default: target/vm-image/machines).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use this build-agent binary instead of building one.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// Build the guest agent with the release profile.
    #[arg(long)]
    release: bool,
}

const MACHINE: &str = "kiln-test";
const PACKAGES: &[&str] = &["linux-image-cloud-amd64", "busybox-static"];
/// Kernel modules the guest needs (the rest of virtio is built in).
const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t tmpfs -o mode=0755 root /newroot
for d in bin lib lib64 usr etc mods stage2; do [ -e /$d ] && cp -a /$d /newroot/; done
exec switch_root /newroot /stage2
"#;

const STAGE2: &str = r#"#!/bin/sh
mkdir -p /proc /sys /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /nix /sys/fs/cgroup /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmp /tmp
mkdir -p /run
mount -t tmpfs -o mode=0755 run /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
for m in $(cat /mods/order); do insmod /mods/$m.ko; done
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
if ! mount -t ext4 /dev/vda /nix 2>/dev/null; then
  echo "kiln: formatting /dev/vda"
  mke2fs -q -F /dev/vda && mount -t ext4 /dev/vda /nix
fi
export PATH=/bin
/bin/build-agent worker --root /
echo "kiln: worker exited with $?"
sync
umount /nix
poweroff -f
"#;

pub fn run(root: &Path, args: VmImageArgs) -> Result<()> {
    let work = root.join("target/vm-image");
    let out = args.out.unwrap_or_else(|| work.join("machines"));
    let agent = match args.agent_bin {
        Some(bin) => bin,
        None => {
            let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            build.args([
                "build",
                "--quiet",
                "-p",
                "build-agent",
                "--bin",
                "build-agent",
            ]);
            if args.release {
                build.arg("--release");
            }
            process::run(&mut build)?;
            root.join("target")
                .join(if args.release { "release" } else { "debug" })
                .join("build-agent")
        }
    };
    let unpacked = unpack_packages(&work)?;
    let kernel = find_kernel(&unpacked)?;
    let image = out.join("default").join(MACHINE);
    let rev_name = format!("{MACHINE}-1.0");
    let rev = image.join(&rev_name);
    if rev.exists() {
        std::fs::remove_dir_all(&rev)
            .with_context(|| format!("cannot remove {}", rev.display()))?;
    }
    std::fs::create_dir_all(&rev)?;
    std::fs::copy(&kernel, rev.join("vmlinuz"))
        .with_context(|| format!("cannot copy {}", kernel.display()))?;
    let initrd = build_initramfs(&work, &unpacked, &agent);
    let _ = std::fs::remove_dir_all(&unpacked);
    let initrd = initrd?;
    std::fs::write(rev.join("initrd.cpio"), &initrd)?;
    process::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(rev.join("disk.qcow2"))
            .arg("4G"),
    )?;
    // The id changes with the contents, so a new image is bootstrapped anew.
    let mut digest = Fnv::default();
    digest.feed(&initrd);
    digest.feed(&std::fs::read(rev.join("vmlinuz"))?);
    let manifest = format!(
        "id = \"{rev_name}-{:016x}\"\nname = \"{MACHINE}\"\nsummary = \"Debian cloud kernel, busybox and Kiln's build-agent (x86_64-linux)\"\n\
         type = \"qemu-linux\"\nkernel = \"vmlinuz\"\ninitrd = \"initrd.cpio\"\ndisk = \"disk.qcow2\"\nappend = \"quiet\"\noptions = []\n",
        digest.0
    );
    std::fs::write(rev.join("machine.toml"), manifest)?;
    let link = image.join(format!("{MACHINE}-1"));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&rev_name, &link)?;
    eprintln!("xtask: machine written to {}", image.display());
    println!("{}", out.display());
    Ok(())
}

/// Downloads and unpacks the packages (once; the `.deb`s are kept).
fn unpack_packages(work: &Path) -> Result<PathBuf> {
    // Several builds may run at once (the tests make one machine each): each
    // downloads into and unpacks under a directory of its own, and the
    // downloaded packages are moved into the shared cache atomically.
    let debs = work.join("debs");
    let unpacked = work.join(format!("unpacked-{}", std::process::id()));
    let downloading = work.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&debs)?;
    let mut wanted: Vec<String> = PACKAGES.iter().map(|p| p.to_string()).collect();
    // The metapackage only depends on the versioned kernel package.
    let depends = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .context("cannot run apt-cache")?;
    let depends = String::from_utf8_lossy(&depends.stdout);
    match depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
    {
        Some(versioned) => wanted.push(format!("linux-image-{versioned}")),
        None => bail!(
            "apt-cache does not know linux-image-cloud-amd64's kernel package; run `apt-get update` first"
        ),
    }
    for package in &wanted {
        let present = std::fs::read_dir(&debs)?.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{package}_"))
        });
        if !present {
            std::fs::create_dir_all(&downloading)?;
            process::run(
                Command::new("apt-get")
                    .args(["download", "-q", package])
                    .current_dir(&downloading),
            )
            .with_context(|| format!("cannot download {package}; try `apt-get update`"))?;
            for entry in std::fs::read_dir(&downloading)?.flatten() {
                std::fs::rename(entry.path(), debs.join(entry.file_name()))?;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&downloading);
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    std::fs::create_dir_all(&unpacked)?;
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            process::run(Command::new("dpkg-deb").arg("-x").arg(&path).arg(&unpacked))?;
        }
    }
    Ok(unpacked)
}

fn find_kernel(unpacked: &Path) -> Result<PathBuf> {
    let boot = unpacked.join("boot");
    std::fs::read_dir(&boot)
        .with_context(|| format!("no {} in the kernel package", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .context("the kernel package has no vmlinuz")
}

/// A module's dependencies, from the `depends=` field of its `.modinfo`.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let needle = b"depends=";
    ko.windows(needle.len())
        .position(|w| w == needle)
        .map(|at| {
            let rest = &ko[at + needle.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn find_module(modules: &Path, name: &str) -> Option<PathBuf> {
    let file = format!("{name}.ko");
    let mut stack = vec![modules.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_string_lossy() == file {
                return Some(path);
            }
        }
    }
    None
}

/// Modules in load order (dependencies first).
fn module_order(modules: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn visit(
        modules: &Path,
        name: &str,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) {
            return Ok(());
        }
        let path = find_module(modules, name)
            .with_context(|| format!("kernel module {name} not in the kernel package"))?;
        for dep in module_depends(&std::fs::read(&path)?) {
            visit(modules, &dep, seen, order)?;
        }
        order.push((name.to_owned(), path));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for m in MODULES {
        visit(modules, m, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// The shared libraries `binary` loads, as `ldd` reports them.
fn libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l
                .split_once("=> ")
                .map_or(l, |(_, p)| p)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn build_initramfs(work: &Path, unpacked: &Path, agent: &Path) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "etc", "mods", "newroot", "tmp"] {
        cpio.dir(dir);
    }
    cpio.file("init", INIT.as_bytes(), 0o755);
    cpio.file("stage2", STAGE2.as_bytes(), 0o755);
    cpio.file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\n", 0o644);
    cpio.file("etc/group", b"root:x:0:\n", 0o644);
    cpio.file(
        "bin/busybox",
        &std::fs::read(unpacked.join("bin/busybox"))?,
        0o755,
    );
    cpio.symlink("bin/sh", "busybox");
    let modules = std::fs::read_dir(unpacked.join("lib/modules"))?
        .flatten()
        .next()
        .context("no kernel modules in the kernel package")?
        .path();
    let mut order = String::new();
    for (name, path) in module_order(&modules)? {
        cpio.file(&format!("mods/{name}.ko"), &std::fs::read(&path)?, 0o644);
        let _ = writeln!(order, "{name}");
    }
    cpio.file("mods/order", order.as_bytes(), 0o644);
    // Debug information is most of a debug build's size; the guest needs none.
    let stripped = work.join(format!("build-agent.stripped-{}", std::process::id()));
    process::run(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(agent)
            .arg(&stripped),
    )?;
    let agent_bytes = std::fs::read(&stripped);
    let _ = std::fs::remove_file(&stripped);
    cpio.file("bin/build-agent", &agent_bytes?, 0o755);
    for lib in libraries(agent)? {
        let relative = lib.strip_prefix("/").expect("absolute").to_owned();
        let mut parent = PathBuf::new();
        for part in relative.parent().into_iter().flat_map(Path::components) {
            parent.push(part);
            cpio.dir(&parent.to_string_lossy());
        }
        let real = std::fs::canonicalize(&lib)?;
        cpio.file(&relative.to_string_lossy(), &std::fs::read(&real)?, 0o755);
    }
    Ok(cpio.finish())
}

/// A `newc` cpio archive, the initramfs format.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        let mut out = self.out;
        out.flush().expect("writing to memory");
        out
    }
}

/// 64-bit FNV-1a, enough to tell images apart.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}
