//! What a sandboxed program sees: its user, root, /dev, /proc, /etc, hostname,
//! environment, output and exit status.

mod common;
use common::*;

#[test]
fn runs_program_and_reports_exit_status_and_output() {
    let (status, out) = run(probe(&["echo", "hello", "id", "exit", "3"]));
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(out.contains("hello\n"), "{out}");
    assert!(
        out.contains("err:hello\n"),
        "stderr goes to the same pipe: {out}"
    );
    assert_eq!(line(&out, "id "), "id 1000 100 1000 100");
}
