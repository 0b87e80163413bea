//! `kiln hash …`: compute and convert hashes as Nix prints them, like
//! `nix hash path`, `nix hash file`, `nix hash convert` and Nix 2.8's
//! `nix hash to-base16/to-base32/to-base64/to-sri`.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use kiln_formats::hash::{Hash, HashAlgo, HashFormat, Hasher};
use kiln_formats::{nar, nixbase32};

#[derive(Debug, clap::Args)]
pub struct HashArgs {
    #[command(subcommand)]
    command: HashCommand,
}

#[derive(Debug, Subcommand)]
enum HashCommand {
    /// Print the hash of the NAR serialisation of each PATH (like `nix hash path`).
    Path {
        #[command(flatten)]
        output: DigestOptions,
        /// Files, symlinks or directories; a symlink is hashed itself, not followed.
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Print the hash of the contents of each regular FILE (like `nix hash file`).
    File {
        #[command(flatten)]
        output: DigestOptions,
        /// Regular files (symlinks to them are followed).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print each HASH in another encoding (like `nix hash convert`).
    Convert {
        /// Encoding to print: base16 (or hex), nix32 (or base32), base64 or sri.
        #[arg(long, value_name = "FORMAT")]
        to: HashFormat,
        /// Encoding the hashes are in (base16, nix32, base64 or sri); guessed from
        /// their length when not given.
        #[arg(long, value_name = "FORMAT")]
        from: Option<HashFormat>,
        #[command(flatten)]
        algo: AlgoOption,
        /// Hashes: `algo:digest`, SRI `algo-base64`, or a bare digest with --type.
        #[arg(required = true, value_name = "HASH")]
        hashes: Vec<String>,
    },
    /// Print each HASH in base-16 (like Nix 2.8's `nix hash to-base16`).
    ToBase16(ConvertTo),
    /// Print each HASH in Nix's base-32 (like Nix 2.8's `nix hash to-base32`).
    ToBase32(ConvertTo),
    /// Print each HASH in base-64 (like Nix 2.8's `nix hash to-base64`).
    ToBase64(ConvertTo),
    /// Print each HASH in SRI form (like Nix 2.8's `nix hash to-sri`).
    ToSri(ConvertTo),
}

/// The algorithm of hashes that do not name one.
#[derive(Debug, clap::Args)]
struct AlgoOption {
    /// Hash algorithm (md5, sha1, sha256 or sha512); needed only for hashes
    /// that do not name theirs, and checked against those that do.
    #[arg(long = "type", visible_alias = "hash-algo", value_name = "ALGO")]
    algo: Option<HashAlgo>,
}

#[derive(Debug, clap::Args)]
struct ConvertTo {
    #[command(flatten)]
    algo: AlgoOption,
    /// Hashes: `algo:digest`, SRI `algo-base64`, or a bare digest with --type.
    #[arg(required = true, value_name = "HASH")]
    hashes: Vec<String>,
}

/// The algorithm and encoding of a computed hash. As in Nix, the last of
/// the encoding flags wins, and the default is SRI.
#[derive(Debug, clap::Args)]
struct DigestOptions {
    /// Hash algorithm: md5, sha1, sha256 or sha512.
    #[arg(long = "type", value_name = "ALGO", default_value = "sha256")]
    algo: HashAlgo,
    /// Print the hash in base-16.
    #[arg(long, overrides_with_all = ["base32", "base64", "sri"])]
    base16: bool,
    /// Print the hash in Nix's base-32.
    #[arg(long, overrides_with_all = ["base16", "base64", "sri"])]
    base32: bool,
    /// Print the hash in base-64.
    #[arg(long, overrides_with_all = ["base16", "base32", "sri"])]
    base64: bool,
    /// Print the hash in SRI form, `algo-base64` (the default).
    #[arg(long, overrides_with_all = ["base16", "base32", "base64"])]
    sri: bool,
}

impl DigestOptions {
    fn format(&self) -> HashFormat {
        if self.base16 {
            HashFormat::Base16
        } else if self.base32 {
            HashFormat::Nixbase32
        } else if self.base64 {
            HashFormat::Base64
        } else {
            HashFormat::Sri
        }
    }
}

pub fn run(args: HashArgs) -> anyhow::Result<ExitCode> {
    let mut out = BufWriter::new(io::stdout().lock());
    // Like Nix, print each result as soon as it is known and stop at the
    // first failure.
    let result = match args.command {
        HashCommand::Path { output, paths } => paths.iter().try_for_each(|path| {
            let (hash, _) = nar::hash_path(path, output.algo)?;
            print(&mut out, &hash, output.format())
        }),
        HashCommand::File { output, files } => files.iter().try_for_each(|file| {
            let hash = hash_file(file, output.algo)?;
            print(&mut out, &hash, output.format())
        }),
        HashCommand::Convert {
            to,
            from,
            algo,
            hashes,
        } => convert(&mut out, &hashes, algo.algo, from, to),
        HashCommand::ToBase16(c) => {
            convert(&mut out, &c.hashes, c.algo.algo, None, HashFormat::Base16)
        }
        HashCommand::ToBase32(c) => convert(
            &mut out,
            &c.hashes,
            c.algo.algo,
            None,
            HashFormat::Nixbase32,
        ),
        HashCommand::ToBase64(c) => {
            convert(&mut out, &c.hashes, c.algo.algo, None, HashFormat::Base64)
        }
        HashCommand::ToSri(c) => convert(&mut out, &c.hashes, c.algo.algo, None, HashFormat::Sri),
    };
    out.flush()?;
    result.map(|()| ExitCode::SUCCESS)
}

/// Prints the digest alone, or `algo-base64` for SRI, as Nix's hash commands do.
fn print(out: &mut impl Write, hash: &Hash, format: HashFormat) -> anyhow::Result<()> {
    writeln!(out, "{}", hash.encode(format))?;
    Ok(())
}

/// The flat hash of a regular file's contents.
fn hash_file(path: &Path, algo: HashAlgo) -> anyhow::Result<Hash> {
    let mut file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut hasher = Hasher::new(algo);
    // Large reads: per-call overhead, not SHA-256, dominates with small ones.
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        }
    }
    Ok(hasher.finish())
}

fn convert(
    out: &mut impl Write,
    hashes: &[String],
    algo: Option<HashAlgo>,
    from: Option<HashFormat>,
    to: HashFormat,
) -> anyhow::Result<()> {
    for s in hashes {
        let hash = Hash::parse_any(s, algo)?;
        if let Some(from) = from {
            let found = encoding_of(s, hash.algo());
            if found != from {
                anyhow::bail!(
                    "hash '{s}' is in {} form, not {} as --from says",
                    format_name(found),
                    format_name(from)
                );
            }
        }
        print(out, &hash, to)?;
    }
    Ok(())
}

/// The encoding of a hash string that parsed as `algo`: SRI, or by the
/// length of the digest as Nix tells them apart.
fn encoding_of(s: &str, algo: HashAlgo) -> HashFormat {
    let digest = match s.split_once(':') {
        Some((_, digest)) => digest,
        None if s.starts_with(&format!("{algo}-")) => return HashFormat::Sri,
        None => s,
    };
    if digest.len() == algo.digest_len() * 2 {
        HashFormat::Base16
    } else if digest.len() == nixbase32::encoded_len(algo.digest_len()) {
        HashFormat::Nixbase32
    } else {
        HashFormat::Base64
    }
}

fn format_name(format: HashFormat) -> &'static str {
    match format {
        HashFormat::Base16 => "base16",
        HashFormat::Nixbase32 => "nix32",
        HashFormat::Base64 => "base64",
        HashFormat::Sri => "sri",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_to_string(
        hash: &str,
        algo: Option<HashAlgo>,
        from: Option<HashFormat>,
        to: HashFormat,
    ) -> anyhow::Result<String> {
        let mut out = Vec::new();
        convert(&mut out, &[hash.to_owned()], algo, from, to)?;
        Ok(String::from_utf8(out)?)
    }

    #[test]
    fn from_must_match_the_input() {
        let h = Hash::digest(HashAlgo::Sha1, b"x");
        for format in [
            HashFormat::Base16,
            HashFormat::Nixbase32,
            HashFormat::Base64,
        ] {
            let typed = h.to_typed_string(format);
            assert_eq!(encoding_of(&typed, HashAlgo::Sha1), format, "{typed}");
            assert_eq!(encoding_of(&h.encode(format), HashAlgo::Sha1), format);
        }
        assert_eq!(encoding_of(&h.to_sri(), HashAlgo::Sha1), HashFormat::Sri);
        let sri = h.to_sri();
        assert_eq!(
            convert_to_string(&sri, None, Some(HashFormat::Sri), HashFormat::Base16).unwrap(),
            format!("{}\n", h.to_base16())
        );
        let err = convert_to_string(&sri, None, Some(HashFormat::Base16), HashFormat::Base16)
            .unwrap_err();
        assert!(err.to_string().contains("in sri form, not base16"), "{err}");
    }
}
