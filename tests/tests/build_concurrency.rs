//! Two `kiln build` processes on one store, asked for the same derivations
//! in opposite orders, with several jobs each: every derivation is built
//! exactly once (the other process waits on its output locks and finds the
//! outputs valid), both succeed, and neither deadlocks — building locally,
//! and handing every build to a build hook that registers the outputs
//! under the locks its scheduler holds.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::kiln_bin;

const PACKAGES: usize = 12;

fn recipe(packages: usize) -> String {
    let mut text = String::new();
    for i in 0..packages {
        // Slow enough that the two processes overlap on every package.
        text.push_str(&format!(
            "[packages.p{i}]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"sleep 0.4; echo p{i} > $out\"]\n\
             env = {{ PATH = \"/usr/bin:/bin\" }}\n\n"
        ));
    }
    let all: Vec<String> = (0..packages).map(|i| format!("\"p{i}\"")).collect();
    text.push_str(&format!(
        "[packages.top]\nbuilder = \"/bin/sh\"\nargs = [\"-c\", \"echo top > $out\"]\ninputs = [{}]\n",
        all.join(", ")
    ));
    text
}

/// The targets of `recipe(packages)` in order, and reversed.
fn targets(recipe_path: &Path, packages: usize) -> [Vec<String>; 2] {
    let recipe_arg = recipe_path.to_str().unwrap();
    let mut forward: Vec<String> = (0..packages)
        .map(|i| format!("{recipe_arg}#p{i}"))
        .collect();
    forward.push(format!("{recipe_arg}#top"));
    let mut backward = forward.clone();
    backward.reverse();
    [forward, backward]
}

/// Runs the two `kiln build` commands `commands` builds (each given its
/// targets) at once, each with `--json`; fails the test if either does not
/// end within 120 s or fails. Returns each one's JSON report and the time
/// both took.
fn run_both(
    dir: &Path,
    targets: &[Vec<String>; 2],
    command: impl Fn(&[String]) -> Command,
) -> ([serde_json::Value; 2], Duration) {
    let started = Instant::now();
    // Output goes to files, not pipes: a process stuck in a sandbox must make
    // this test fail with a message, never hang it.
    let spawn = |targets: &[String], name: &str| {
        let out = std::fs::File::create(dir.join(format!("{name}.out"))).unwrap();
        let err = std::fs::File::create(dir.join(format!("{name}.err"))).unwrap();
        command(targets)
            .arg("--json")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap()
    };
    let mut children = [spawn(&targets[0], "first"), spawn(&targets[1], "second")];
    let deadline = started + Duration::from_secs(120);
    let mut statuses: [Option<ExitStatus>; 2] = [None, None];
    while statuses.iter().any(Option::is_none) {
        for (child, status) in children.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().unwrap();
            }
        }
        if Instant::now() > deadline {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            let err = |name: &str| {
                std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default()
            };
            panic!(
                "the two kiln build processes did not finish within 120 s (deadlock?): {statuses:?}\nfirst:\n{}\nsecond:\n{}",
                err("first"),
                err("second")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    let report = |name: &str, status: Option<ExitStatus>| {
        let status = status.unwrap();
        let err = std::fs::read(dir.join(format!("{name}.err"))).unwrap();
        assert!(
            status.success(),
            "the {name} process failed ({status}):\n{}",
            String::from_utf8_lossy(&err)
        );
        let out = std::fs::read(dir.join(format!("{name}.out"))).unwrap();
        serde_json::from_slice(&out).unwrap_or_else(|e| {
            panic!(
                "the {name} process printed no JSON report ({e}):\n{}",
                String::from_utf8_lossy(&out)
            )
        })
    };
    (
        [report("first", statuses[0]), report("second", statuses[1])],
        elapsed,
    )
}

/// Checks that every one of the `goals` derivations was built by exactly
/// one of the two processes and found valid by the other.
fn assert_built_once(reports: &[serde_json::Value; 2], goals: usize) {
    let mut built: BTreeMap<String, usize> = BTreeMap::new();
    for json in reports {
        let all = json["goals"].as_object().expect("a goals object");
        assert_eq!(all.len(), goals, "{json}");
        for (drv, status) in all {
            let status = status.as_str().unwrap();
            assert!(
                status == "Built" || status == "AlreadyValid",
                "{drv}: {status}"
            );
            *built.entry(drv.clone()).or_default() += usize::from(status == "Built");
        }
    }
    for (drv, times) in &built {
        assert_eq!(
            *times, 1,
            "{drv} was built {times} times across the two processes"
        );
    }
}

#[test]
fn overlapping_builds_build_each_derivation_once() {
    let kiln = kiln_bin();
    let dir = tempfile::tempdir().unwrap();
    let recipe_path = dir.path().join("kiln.toml");
    std::fs::write(&recipe_path, recipe(PACKAGES)).unwrap();
    let store = format!("local?root={}", dir.path().join("root").display());
    let (reports, elapsed) = run_both(dir.path(), &targets(&recipe_path, PACKAGES), |targets| {
        let mut cmd = Command::new(&kiln);
        cmd.args(["build", "--store", &store, "--no-out-link", "-j", "4", "-Q"])
            .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64?"])
            .args(targets);
        cmd
    });
    assert_built_once(&reports, PACKAGES + 1);
    // 12 × 0.4 s over 8 job slots in two processes: the work overlaps, and
    // waiting for a lock is woken by its release, not by a polling sleep.
    assert!(
        elapsed < Duration::from_secs(30),
        "the two builds took {elapsed:?}"
    );
}

/// A build hook for the test, in Perl (Nix's own hook was a Perl script
/// once): it accepts every build, builds it with `kiln build` in a store
/// of its own (a "remote machine"), and copies the outputs back with
/// `kiln store import` under `NIX_HELD_LOCKS`, as Nix's hook child
/// processes learn that their scheduler holds the output locks. Each
/// derivation it builds is appended to `hook-builds.log`.
const TEST_HOOK: &str = r##"
use strict;
use warnings;
sub rd {
    my ($n) = @_;
    my $buf = '';
    while (length($buf) < $n) {
        my $r = sysread(STDIN, $buf, $n - length($buf), length($buf));
        die "test hook: stdin ended
" unless $r;
    }
    return $buf;
}
sub num { return unpack('Q<', rd(8)); }
sub str {
    my $len = num();
    my $s = rd($len);
    rd((8 - $len % 8) % 8);
    return $s;
}
sub strs { my $n = num(); return map { str() } 1 .. $n; }
while (num()) { str(); str(); }
my ($try, $willing, $system, $drv) = (str(), num(), str(), str());
strs();
$| = 1;
print STDERR "# accept
test-machine
";
my @inputs = strs();
my @missing = strs();
my ($kiln, $store, $dir) = @ENV{qw(TEST_HOOK_KILN TEST_HOOK_STORE TEST_HOOK_DIR)};
open(my $rec, '>>', "$dir/hook-builds.log") or die;
print $rec "$drv
";
close $rec;
my $remote = "local?root=$dir/remote-$$";
sub sh { my ($cmd) = @_; system('/bin/sh', '-c', "$cmd >&4 2>&4") == 0 or exit 1; }
sh("'$kiln' store --store '$store' export -r $drv @inputs | '$kiln' store --store '$remote' import >/dev/null");
sh("'$kiln' build --store '$remote' --no-out-link -Q --option sandbox-paths '/bin /usr /lib /lib64?' $drv >/dev/null");
$ENV{NIX_HELD_LOCKS} = "@missing";
sh("'$kiln' store --store '$remote' export @missing | '$kiln' store --store '$store' import >/dev/null");
exit 0;
"##;

#[test]
fn overlapping_offloaded_builds_build_each_derivation_once() {
    const OFFLOADED: usize = 6;
    let kiln = kiln_bin();
    let perl = Path::new("/usr/bin/perl");
    assert!(
        perl.exists(),
        "this test's build hook is a Perl script: install perl at /usr/bin/perl"
    );
    let dir = tempfile::tempdir().unwrap();
    let hook = dir.path().join("test-hook.pl");
    std::fs::write(&hook, TEST_HOOK).unwrap();
    let recipe_path = dir.path().join("kiln.toml");
    std::fs::write(&recipe_path, recipe(OFFLOADED)).unwrap();
    let store = format!("local?root={}", dir.path().join("root").display());
    let (reports, _) = run_both(dir.path(), &targets(&recipe_path, OFFLOADED), |targets| {
        let mut cmd = Command::new(&kiln);
        // -j 0: every build goes through the hook.
        cmd.args(["build", "--store", &store, "--no-out-link", "-j", "0", "-Q"])
            .args(["--option", "sandbox-paths", "/bin /usr /lib /lib64?"])
            .args(["--option", "build-hook"])
            .arg(format!("{} {}", perl.display(), hook.display()))
            .args(targets)
            .env("TEST_HOOK_KILN", &kiln)
            .env("TEST_HOOK_STORE", &store)
            .env("TEST_HOOK_DIR", dir.path());
        cmd
    });
    assert_built_once(&reports, OFFLOADED + 1);
    let log = std::fs::read_to_string(dir.path().join("hook-builds.log"))
        .expect("the test hook built nothing");
    let mut handed: BTreeMap<&str, usize> = BTreeMap::new();
    for drv in log.lines() {
        *handed.entry(drv).or_default() += 1;
    }
    assert_eq!(handed.len(), OFFLOADED + 1, "{log}");
    for (drv, times) in &handed {
        assert_eq!(
            *times, 1,
            "{drv} was handed to the hook {times} times:\n{log}"
        );
    }
}
