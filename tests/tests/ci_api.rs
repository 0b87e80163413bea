//! kiln-ci's writing API through its command line, against SQLite and
//! PostgreSQL: `serve` refuses a non-loopback address without a token,
//! `evaluate` is refused without the token and starts an evaluation with
//! it, and triggers while one runs queue one evaluation after it, never
//! beside it.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_ci::db::Db;
use kiln_ci::model::EvaluationStatus;
use kiln_ci::testing::TempPostgres;
use kiln_e2e::ci::{self, sh};

struct Site {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
    token_file: PathBuf,
    db_url: String,
}

fn site(db_url: Option<String>) -> Site {
    ci::require_git();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    sh(
        &repo,
        "git init -q -b main . && git config user.email ci@test && git config user.name ci \
         && echo one > file && git add file && git commit -qm one",
    );
    let db_url = db_url.unwrap_or_else(|| dir.join("ci.sqlite").to_string_lossy().into_owned());
    let config = dir.join("ci.conf");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\nstore = \"{}\"\ndb = \"{db_url}\"\n",
            dir.join("state").display(),
            dir.join("store").display(),
        ),
    )
    .unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "correct horse battery staple\n").unwrap();
    Site {
        _tmp: tmp,
        dir,
        config,
        token_file,
        db_url,
    }
}

impl Site {
    fn kiln_ci(&self) -> Command {
        let mut command = ci::kiln_ci(&self.config, &self.dir);
        command.env_remove("KILN_CI_API_TOKEN_FILE");
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        self.kiln_ci().args(args).output().unwrap()
    }

    /// `kiln-ci serve` on a free loopback port with the token; its address.
    fn serve(&self) -> (Server, String) {
        let mut serve = self
            .kiln_ci()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("KILN_CI_API_TOKEN_FILE", &self.token_file)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(serve.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
            assert!(n > 0, "kiln-ci serve ended before listening");
            if let Some(rest) = line.trim().strip_prefix("kiln-ci: listening on ") {
                // Its log goes on: a closed pipe would make it fail.
                std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
                return (Server(serve), rest.to_owned());
            }
        }
    }
}

/// A running `kiln-ci serve`, stopped when the test ends, passed or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for `child` to end by itself within `limit`; kills it otherwise.
fn ends_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

async fn writes_need_the_token(site: Site) {
    let repo = site.dir.join("repo");
    let input = format!("src={}@branch:main", repo.display());
    let added = site.output(&[
        "spec", "add", "main", "--input", &input, "--", "sh", "-c", "sleep 3",
    ]);
    assert!(added.status.success(), "{}", text(&added.stderr));

    // Open writes on every address: refused at start, saying what to do.
    let mut open = site
        .kiln_ci()
        .args(["serve", "--listen", "0.0.0.0:0"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = ends_within(&mut open, Duration::from_secs(60))
        .expect("kiln-ci serve listened on 0.0.0.0 without a token");
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut open.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains("refusing to serve the API's writing routes on 0.0.0.0")
            && stderr.contains("--api-token-file"),
        "{stderr}"
    );

    let (serve, base) = site.serve();
    let token = site.token_file.to_str().unwrap();

    // Without the token: refused, nothing started.
    let refused = site.output(&["evaluate", "main", "--url", &base]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("Authorization: Bearer"),
        "{stderr}"
    );
    let wrong = site.dir.join("wrong");
    std::fs::write(&wrong, "not it\n").unwrap();
    let refused = site.output(&[
        "evaluate",
        "main",
        "--url",
        &base,
        "--api-token-file",
        wrong.to_str().unwrap(),
    ]);
    assert!(text(&refused.stderr).contains("the bearer token is wrong"));

    // With it: started; triggers meanwhile queue one evaluation more.
    let evaluate = |extra: &[&str]| {
        let mut args = vec![
            "evaluate",
            "main",
            "--url",
            &base,
            "--api-token-file",
            token,
        ];
        args.extend(extra);
        let out = site.output(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    assert_eq!(evaluate(&[]), "evaluation 1");
    for _ in 0..3 {
        assert_eq!(evaluate(&[]), "queued behind evaluation 1");
    }
    // --wait follows the queued evaluation, once evaluation 1 has ended.
    let second = evaluate(&["--wait"]);
    // PostgreSQL's sequence counts the refused inserts too: any later id.
    let second: i64 = second
        .strip_prefix("evaluation ")
        .and_then(|rest| rest.strip_suffix(": succeeded"))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not a succeeded evaluation: {second}"));
    assert!(second > 1, "{second}");
    drop(serve);

    let db = Db::open(&site.db_url).await.unwrap();
    let evaluations = db.list_evaluations("main", 0).await.unwrap();
    let statuses: Vec<(i64, EvaluationStatus)> =
        evaluations.iter().map(|e| (e.id, e.status)).collect();
    assert_eq!(
        statuses,
        [
            (second, EvaluationStatus::Succeeded),
            (1, EvaluationStatus::Succeeded)
        ]
    );
    // Four triggers, two evaluations, one after the other.
    assert!(evaluations[0].created_at >= evaluations[1].evaluated_at.unwrap());
    db.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_the_token_on_sqlite() {
    writes_need_the_token(site(None)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_need_the_token_on_postgres() {
    let cluster = TempPostgres::start().expect("a throwaway PostgreSQL cluster");
    let url = cluster.create_database("kiln_ci_api").unwrap();
    writes_need_the_token(site(Some(url))).await;
}
