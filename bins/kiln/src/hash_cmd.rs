//! `kiln hash …`

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct HashArgs {}

pub fn run(_args: HashArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'kiln hash' is being written")
}
