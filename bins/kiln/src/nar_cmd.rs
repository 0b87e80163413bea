//! `kiln nar …`

use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct NarArgs {}

pub fn run(_args: NarArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("'kiln nar' is being written")
}
