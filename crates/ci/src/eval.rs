//! Evaluations' first half: fetch a specification's git inputs (in
//! parallel, into a cache of bare repositories), check them out, and run the
//! evaluator, whose stdout is JSON lines in nix-eval-jobs' format and whose
//! stderr goes, with the fetch messages, to a zstd-compressed log.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use sha2::Digest as _;

use crate::model::{Checkout, GitRef, Input, Specification};

/// What went wrong fetching inputs or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("input '{input}': repository '{url}' is unreachable: {message}")]
    Unreachable {
        input: String,
        url: String,
        message: String,
    },
    #[error("input '{input}': repository '{url}' has no {reference}: {message}")]
    BadRef {
        input: String,
        url: String,
        reference: GitRef,
        message: String,
    },
    #[error("cannot run git ({0}); is git installed?")]
    NoGit(std::io::Error),
    #[error("{what} '{}': {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("specification '{spec}' evaluates in input '{input}', which it does not have")]
    NoEvalInput { spec: String, input: String },
    #[error("specification '{0}' has no evaluator command")]
    NoEvaluator(String),
    #[error("cannot start the evaluator '{command}': {source}")]
    EvaluatorStart {
        command: String,
        source: std::io::Error,
    },
    #[error("the evaluator '{command}' failed ({status}); see the evaluation's log")]
    EvaluatorFailed { command: String, status: String },
    #[error("the evaluator printed a line that is not a nix-eval-jobs job: {line:?} ({problem})")]
    BadJobLine { line: String, problem: String },
    #[error("evaluation task failed: {0}")]
    Join(String),
}

type Result<T, E = EvalError> = std::result::Result<T, E>;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EvalError + use<> {
    let path = path.to_owned();
    move |source| EvalError::Io { what, path, source }
}

/// A job as the evaluator prints it (nix-eval-jobs' format; other fields
/// are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Job {
    pub attr: String,
    #[serde(rename = "drvPath", default)]
    pub drv_path: String,
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
    #[serde(default)]
    pub system: String,
    /// Set for an attribute that failed to evaluate.
    #[serde(default)]
    pub error: Option<String>,
}

/// The evaluator's jobs, and the attributes it could not evaluate.
#[derive(Debug, Default)]
pub struct EvalOutput {
    pub jobs: Vec<Job>,
    pub errors: Vec<(String, String)>,
}

/// A zstd-compressed log shared by the threads of one evaluation.
#[derive(Clone)]
pub struct EvalLog {
    inner: Arc<Mutex<Option<zstd::Encoder<'static, std::fs::File>>>>,
    path: PathBuf,
}

impl std::fmt::Debug for EvalLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvalLog").field("path", &self.path).finish()
    }
}

impl EvalLog {
    pub fn create(path: &Path) -> Result<EvalLog> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io("create log directory", parent))?;
        }
        let file = std::fs::File::create(path).map_err(io("create log", path))?;
        let encoder = zstd::Encoder::new(file, 3).map_err(io("create log", path))?;
        Ok(EvalLog {
            inner: Arc::new(Mutex::new(Some(encoder))),
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a line (a log is best effort: a write error loses the line).
    pub fn line(&self, text: &str) {
        if let Some(encoder) = self
            .inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = writeln!(encoder, "{text}");
        }
    }

    /// Ends the zstd frame and closes the file.
    pub fn finish(&self) -> Result<()> {
        if let Some(encoder) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            encoder.finish().map_err(io("write log", &self.path))?;
        }
        Ok(())
    }
}

/// Reads a compressed evaluation log back.
pub fn read_log(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io("read log", path))?;
    let text = zstd::decode_all(&bytes[..]).map_err(io("decompress log", path))?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

fn git(args: &[&str], dir: Option<&Path>) -> Result<std::process::Output> {
    let mut command = Command::new("git");
    if let Some(dir) = dir {
        command.arg("-C").arg(dir);
    }
    command
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(EvalError::NoGit)
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_owned()
}

/// Fetches one input into `cache` and checks its revision out into
/// `cache/checkouts/<commit>`. Returns the checkout and its directory.
pub fn fetch_input(cache: &Path, input: &Input, log: &EvalLog) -> Result<(Checkout, PathBuf)> {
    let key: String = sha2::Sha256::digest(input.url.as_bytes())
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let repo = cache.join("git").join(format!("{key}.git"));
    std::fs::create_dir_all(cache.join("git")).map_err(io("create repository cache", cache))?;
    // Inputs from one repository (in this or another evaluation) share its
    // cache: git's own ref locks make concurrent fetches fail, so take turns.
    let lock_path = cache.join("git").join(format!("{key}.lock"));
    let _lock = lock_exclusive(&lock_path)?;
    if !repo.join("HEAD").exists() {
        std::fs::create_dir_all(&repo).map_err(io("create repository cache", &repo))?;
        let out = git(&["init", "--quiet", "--bare"], Some(&repo))?;
        if !out.status.success() {
            return Err(EvalError::Io {
                what: "git init",
                path: repo,
                source: std::io::Error::other(stderr_of(&out)),
            });
        }
    }
    log.line(&format!(
        "fetching input '{}' from {} ({})",
        input.name, input.url, input.reference
    ));
    let unreachable = |message: String| EvalError::Unreachable {
        input: input.name.clone(),
        url: input.url.clone(),
        message,
    };
    let bad_ref = |message: String| EvalError::BadRef {
        input: input.name.clone(),
        url: input.url.clone(),
        reference: input.reference.clone(),
        message,
    };
    // ls-remote tells an unreachable repository from a missing ref.
    let listing = git(&["ls-remote", "--", &input.url], Some(&repo))?;
    if !listing.status.success() {
        let message = stderr_of(&listing);
        log.line(&message);
        return Err(unreachable(message));
    }
    let commit = match &input.reference {
        GitRef::Branch(_) | GitRef::Tag(_) => {
            let refspec = format!("+{}:refs/kiln/{}", input.reference.refspec(), input.name);
            let out = git(
                &["fetch", "--quiet", "--no-tags", "--", &input.url, &refspec],
                Some(&repo),
            )?;
            if !out.status.success() {
                let message = stderr_of(&out);
                log.line(&message);
                return Err(bad_ref(message));
            }
            let out = git(
                &["rev-parse", &format!("refs/kiln/{}^{{commit}}", input.name)],
                Some(&repo),
            )?;
            if !out.status.success() {
                return Err(bad_ref(stderr_of(&out)));
            }
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
        GitRef::Commit(commit) => {
            let have = |repo: &Path| {
                git(
                    &["cat-file", "-e", &format!("{commit}^{{commit}}")],
                    Some(repo),
                )
                .map(|o| o.status.success())
            };
            if !have(&repo)? {
                let out = git(
                    &[
                        "fetch",
                        "--quiet",
                        "--tags",
                        "--",
                        &input.url,
                        "+refs/heads/*:refs/kiln-all/heads/*",
                    ],
                    Some(&repo),
                )?;
                if !out.status.success() {
                    log.line(&stderr_of(&out));
                    return Err(unreachable(stderr_of(&out)));
                }
                if !have(&repo)? {
                    return Err(bad_ref(format!(
                        "commit {commit} is on none of its branches and tags"
                    )));
                }
            }
            let out = git(&["rev-parse", &format!("{commit}^{{commit}}")], Some(&repo))?;
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    let checkout = cache.join("checkouts").join(&commit);
    if !checkout.exists() {
        let partial = cache
            .join("checkouts")
            .join(format!(".{commit}.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io("create checkout", &partial))?;
        let work_tree = format!("--work-tree={}", partial.display());
        let out = git(
            &[
                &work_tree, "checkout", "--quiet", "--force", &commit, "--", ".",
            ],
            Some(&repo),
        )?;
        if !out.status.success() {
            return Err(bad_ref(stderr_of(&out)));
        }
        match std::fs::rename(&partial, &checkout) {
            Ok(()) => {}
            // Another evaluation checked the same commit out meanwhile.
            Err(_) if checkout.exists() => {
                let _ = std::fs::remove_dir_all(&partial);
            }
            Err(e) => return Err(io("create checkout", &checkout)(e)),
        }
    }
    log.line(&format!("input '{}' is at commit {commit}", input.name));
    Ok((
        Checkout {
            input: input.name.clone(),
            url: input.url.clone(),
            commit,
        },
        checkout,
    ))
}

/// An exclusive `flock` on `path`, released when the file is dropped.
fn lock_exclusive(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io("open lock", path))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("lock", path)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Fetches all inputs in parallel (blocking; one thread per input).
pub fn fetch_inputs(
    cache: &Path,
    inputs: &[Input],
    log: &EvalLog,
) -> Result<Vec<(Checkout, PathBuf)>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|input| scope.spawn(move || fetch_input(cache, input, log)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| EvalError::Join("a fetch thread panicked".into()))?
            })
            .collect()
    })
}

/// Environment variable naming an input's checkout for the evaluator.
pub fn input_variable(name: &str) -> String {
    let upper: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("KILN_CI_INPUT_{upper}")
}

/// Runs the evaluator in the checkout of the evaluation input (blocking).
/// `extra_env` is passed on (e.g. `KILN_CI_STORE`).
pub fn run_evaluator(
    spec: &Specification,
    checkouts: &[(Checkout, PathBuf)],
    extra_env: &[(String, String)],
    log: &EvalLog,
) -> Result<EvalOutput> {
    let (program, args) = spec
        .evaluator
        .split_first()
        .ok_or_else(|| EvalError::NoEvaluator(spec.name.clone()))?;
    let dir = checkouts
        .iter()
        .find(|(c, _)| c.input == spec.eval_input)
        .map(|(_, dir)| dir)
        .ok_or_else(|| EvalError::NoEvalInput {
            spec: spec.name.clone(),
            input: spec.eval_input.clone(),
        })?;
    let command_line = spec.evaluator.join(" ");
    log.line(&format!("running the evaluator: {command_line}"));
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (checkout, path) in checkouts {
        command.env(input_variable(&checkout.input), path);
    }
    command.envs(extra_env.iter().map(|(k, v)| (k, v)));
    let mut child = command
        .spawn()
        .map_err(|source| EvalError::EvaluatorStart {
            command: command_line.clone(),
            source,
        })?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    let err_log = log.clone();
    let stderr_thread = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            match line {
                Ok(line) => err_log.line(&line),
                Err(_) => break,
            }
        }
    });
    let mut output = EvalOutput::default();
    let mut bad_line = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Job>(&line) {
            Ok(job) => match &job.error {
                Some(error) => {
                    log.line(&format!("error evaluating '{}': {error}", job.attr));
                    output.errors.push((job.attr.clone(), error.clone()));
                }
                None if job.drv_path.is_empty() => {
                    output
                        .errors
                        .push((job.attr.clone(), "the job has no drvPath".into()));
                }
                None => output.jobs.push(job),
            },
            Err(e) => {
                log.line(&format!("not a job: {line}"));
                bad_line.get_or_insert((line, e.to_string()));
            }
        }
    }
    let status = child.wait().map_err(|source| EvalError::EvaluatorStart {
        command: command_line.clone(),
        source,
    })?;
    let _ = stderr_thread.join();
    if !status.success() {
        log.line(&format!("the evaluator failed: {status}"));
        return Err(EvalError::EvaluatorFailed {
            command: command_line,
            status: status.to_string(),
        });
    }
    if let Some((line, problem)) = bad_line {
        return Err(EvalError::BadJobLine { line, problem });
    }
    log.line(&format!(
        "{} jobs, {} evaluation errors",
        output.jobs.len(),
        output.errors.len()
    ));
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(dir: &Path, script: &str) {
        let status = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(status.success(), "{script}");
    }

    #[test]
    fn fetches_branches_tags_commits_and_says_what_is_wrong() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        sh(
            &repo,
            "git init -q -b main . && git config user.email t@t && git config user.name t \
             && echo one > f && git add f && git commit -qm one && git tag v1 \
             && echo two > f && git commit -qam two",
        );
        let cache = tmp.path().join("cache");
        let log = EvalLog::create(&tmp.path().join("log.zst")).unwrap();
        let url = repo.to_string_lossy().into_owned();
        let input = |reference| Input {
            name: "src".into(),
            url: url.clone(),
            reference,
        };
        let fetched = fetch_inputs(
            &cache,
            &[
                input(GitRef::Branch("main".into())),
                Input {
                    name: "old".into(),
                    ..input(GitRef::Tag("v1".into()))
                },
            ],
            &log,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(fetched[0].1.join("f")).unwrap(),
            "two\n"
        );
        assert_eq!(
            std::fs::read_to_string(fetched[1].1.join("f")).unwrap(),
            "one\n"
        );
        let (by_commit, dir) = fetch_input(
            &cache,
            &input(GitRef::Commit(fetched[1].0.commit.clone())),
            &log,
        )
        .unwrap();
        assert_eq!(by_commit.commit, fetched[1].0.commit);
        assert_eq!(dir, fetched[1].1);

        let err = fetch_input(&cache, &input(GitRef::Branch("nope".into())), &log).unwrap_err();
        assert!(matches!(err, EvalError::BadRef { .. }), "{err}");
        let err = fetch_input(&cache, &input(GitRef::Commit("0".repeat(40))), &log).unwrap_err();
        assert!(matches!(err, EvalError::BadRef { .. }), "{err}");
        let missing = Input {
            url: tmp.path().join("missing").to_string_lossy().into_owned(),
            ..input(GitRef::Branch("main".into()))
        };
        let err = fetch_input(&cache, &missing, &log).unwrap_err();
        assert!(matches!(err, EvalError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains("unreachable"), "{err}");
        log.finish().unwrap();
        let text = read_log(log.path()).unwrap();
        assert!(text.contains("input 'src' is at commit"), "{text}");
    }

    #[test]
    fn evaluator_jobs_errors_and_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let log = EvalLog::create(&tmp.path().join("log.zst")).unwrap();
        let checkout = Checkout {
            input: "src".into(),
            url: "u".into(),
            commit: "c".into(),
        };
        let mut spec = Specification {
            eval_input: "src".into(),
            ..Specification::new("s", vec![], vec![
                "sh".into(),
                "-c".into(),
                r#"echo "evaluating in $PWD with $KILN_CI_INPUT_SRC" >&2
echo '{"attr":"a","drvPath":"/nix/store/x-a.drv","outputs":{"out":"/nix/store/y-a"},"system":"x86_64-linux"}'
echo '{"attr":"b","error":"undefined variable"}'"#
                    .into(),
            ])
        };
        let checkouts = vec![(checkout, tmp.path().to_owned())];
        let out = run_evaluator(&spec, &checkouts, &[], &log).unwrap();
        assert_eq!(out.jobs.len(), 1);
        assert_eq!(out.jobs[0].outputs["out"], "/nix/store/y-a");
        assert_eq!(out.errors, [("b".into(), "undefined variable".into())]);
        spec.evaluator = vec!["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()];
        let err = run_evaluator(&spec, &checkouts, &[], &log).unwrap_err();
        assert!(matches!(err, EvalError::EvaluatorFailed { .. }), "{err}");
        log.finish().unwrap();
        let text = read_log(log.path()).unwrap();
        assert!(
            text.contains("boom") && text.contains("evaluating in"),
            "{text}"
        );
    }
}
