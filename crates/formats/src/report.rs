//! Error chains for people: an error and its causes on one line.
//!
//! Kiln's error messages usually name their cause already (`cannot read
//! 'x': No such file or directory`), while `anyhow`'s `{:#}` appends every
//! cause again. [`chain`] appends a cause only when the text so far does not
//! already say it, so each fact is printed once.

use std::error::Error;

/// `err` followed by those of its causes that its message does not include,
/// separated by `": "`.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(source) = cause {
        let message = source.to_string();
        if !message.is_empty() && !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        cause = source.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read recipe 'r.toml': {0}")]
        Repeats(#[source] std::io::Error),
        #[error("cannot build")]
        Silent(#[source] std::io::Error),
    }

    fn missing() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no such file")
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let err = Outer::Repeats(missing());
        assert_eq!(chain(&err), "cannot read recipe 'r.toml': no such file");
    }

    #[test]
    fn a_cause_the_message_leaves_out_is_appended() {
        let err = Outer::Silent(missing());
        assert_eq!(chain(&err), "cannot build: no such file");
    }

    #[test]
    fn anyhow_contexts_are_kept() {
        let err = anyhow::Error::new(Outer::Repeats(missing())).context("building hello");
        assert_eq!(
            chain(err.as_ref()),
            "building hello: cannot read recipe 'r.toml': no such file"
        );
    }
}
