//! `kiln store copy` and `kiln store serve-cache`: moving closures between
//! a store and binary caches (`file://DIR`, `http(s)://…`), as `nix copy`
//! does, and serving a store over HTTP as a signed binary cache.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Subcommand;
use kiln_formats::signature::TrustedKeys;
use kiln_formats::store_path::{StorePath, StorePathSet};
use kiln_protocol::open_store;
use kiln_store::Store;
use kiln_store::binary_cache::read_secret_key;
use kiln_store::binary_cache::serve::{CacheServer, ServeOptions};
use kiln_store::substitute::{CopyOptions, copy_paths};

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Copy paths and their closures between stores (like `nix copy`):
    /// from a binary cache into the store (`--from URL`), or from the
    /// store into a binary cache (`--to file:///DIR?compression=zstd&secret-key=FILE`).
    Copy {
        /// The store to copy from (instead of --store).
        #[arg(long, required_unless_present = "to")]
        from: Option<String>,
        /// The store to copy to (instead of --store).
        #[arg(long, conflicts_with = "from")]
        to: Option<String>,
        /// Accept paths without a signature by a trusted key.
        #[arg(long)]
        no_check_sigs: bool,
        /// Public keys whose signatures are accepted, space-separated
        /// (`name:base64 …`); default: `trusted-public-keys` of nix.conf.
        #[arg(long, env = "KILN_TRUSTED_PUBLIC_KEYS")]
        trusted_public_keys: Option<String>,
        /// Copy only the paths given, not their closures.
        #[arg(long)]
        no_recursive: bool,
        /// Paths copied at once (default: one per CPU, 8 over HTTP).
        #[arg(short = 'j', long, default_value_t = 0)]
        jobs: usize,
        /// Store paths to copy (`/nix/store/…` or their base names).
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Serve the store over HTTP as a binary cache (like nix-serve), for
    /// `nix copy --from http://…` or as a substituter.
    ServeCache {
        /// Address to listen on (`127.0.0.1:0` picks a free port).
        #[arg(long, default_value = "127.0.0.1:5000")]
        listen: String,
        /// Secret key file to sign the narinfos with (from `generate-key`).
        #[arg(long)]
        key: Option<std::path::PathBuf>,
        /// `Priority` announced in nix-cache-info.
        #[arg(long, default_value_t = 30)]
        priority: i32,
    },
}

pub fn run(store_url: &str, command: CacheCommand) -> anyhow::Result<ExitCode> {
    match command {
        CacheCommand::Copy {
            from,
            to,
            no_check_sigs,
            trusted_public_keys,
            no_recursive,
            jobs,
            paths,
        } => {
            let (src_url, dst_url) = match (&from, &to) {
                (Some(from), None) => (from.as_str(), store_url),
                (None, Some(to)) => (store_url, to.as_str()),
                _ => bail!("give exactly one of --from URL and --to URL"),
            };
            let src = open_store(src_url).with_context(|| format!("opening '{src_url}'"))?;
            let dst = open_store(dst_url).with_context(|| format!("opening '{dst_url}'"))?;
            let trusted = match &trusted_public_keys {
                Some(keys) => TrustedKeys::parse(keys).context("reading --trusted-public-keys")?,
                None => kiln_store::nix_conf::NixConf::load()?.trusted_public_keys()?,
            };
            // As Nix: what enters a store of this machine must be signed
            // (`require-sigs`); a binary cache takes what it is given.
            let check = !no_check_sigs && !dst_url.starts_with("file://") && !is_http(dst_url);
            let set = paths
                .iter()
                .map(|p| parse_path(&*src, p))
                .collect::<anyhow::Result<StorePathSet>>()?;
            let options = CopyOptions {
                trusted_keys: check.then_some(trusted),
                jobs,
                no_closure: no_recursive,
            };
            let started = std::time::Instant::now();
            let report = copy_paths(&*src, &*dst, &set, &options)
                .with_context(|| format!("copying from '{src_url}' to '{dst_url}'"))?;
            eprintln!(
                "copied {} paths ({} there already) in {:.2} s",
                report.copied.len(),
                report.already_valid,
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::ServeCache {
            listen,
            key,
            priority,
        } => {
            let store: Arc<dyn Store> = open_store(store_url)
                .with_context(|| format!("opening '{store_url}'"))?
                .into();
            let secret_key = key.as_deref().map(read_secret_key).transpose()?;
            let server = CacheServer::bind(&listen)?;
            // The address first and alone on stdout, so scripts (and
            // tests, with port 0) can read where to connect.
            println!("http://{}", server.local_addr());
            eprintln!(
                "serving '{}' as a binary cache at http://{}/ ({})",
                store.url(),
                server.local_addr(),
                if secret_key.is_some() {
                    "signed"
                } else {
                    "unsigned"
                }
            );
            use std::io::Write;
            std::io::stdout().flush()?;
            server.serve(
                store,
                &ServeOptions {
                    secret_key,
                    priority,
                    ..ServeOptions::default()
                },
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// A store path as `/nix/store/…-name` (or below it) or `…-name`.
fn parse_path(store: &dyn Store, arg: &str) -> anyhow::Result<StorePath> {
    if let Ok((path, _)) = store.store_dir().split_path(arg) {
        return Ok(path);
    }
    arg.parse().with_context(|| {
        format!(
            "'{arg}' is not a store path (expected {}/<hash>-<name>)",
            store.store_dir()
        )
    })
}
