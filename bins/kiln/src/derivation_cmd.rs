//! `kiln derivation …`

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct DerivationArgs {}

pub fn run(_args: DerivationArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'kiln derivation' is being written")
}
