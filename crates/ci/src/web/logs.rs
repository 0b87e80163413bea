//! Reading a build's stored log (plain, `.bz2` as Nix keeps them, or
//! `.zst`), and cutting logs into chunks for the tail.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// A stored log that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the build log '{}': {source}", path.display())]
pub struct LogReadError {
    path: PathBuf,
    source: io::Error,
}

/// The whole log at `path`, decompressed by its extension; `None` when the
/// file does not exist (yet, or any more).
pub async fn read_stored(path: &str) -> Result<Option<Vec<u8>>, LogReadError> {
    let path = PathBuf::from(path);
    let read_path = path.clone();
    tokio::task::spawn_blocking(move || read_blocking(&read_path))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
        .map_err(|source| LogReadError { path, source })
}

fn read_blocking(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    match path.extension().and_then(|e| e.to_str()) {
        Some("bz2") => {
            bzip2::read::MultiBzDecoder::new(file).read_to_end(&mut out)?;
        }
        Some("zst") => {
            // The log of a running evaluation is a zstd stream still being
            // written: show what decodes so far rather than nothing.
            let mut decoder = zstd::stream::read::Decoder::new(file)?;
            if let Err(e) = decoder.read_to_end(&mut out) {
                if out.is_empty() {
                    return Err(e);
                }
            }
        }
        _ => {
            io::BufReader::new(file).read_to_end(&mut out)?;
        }
    }
    Ok(Some(out))
}

/// How many of `bytes` make whole UTF-8 characters: a chunk that ends in the
/// middle of a character leaves its start for the next chunk, so that
/// pieces joined by a reader decode as the whole would.
pub fn whole_chars_len(bytes: &[u8]) -> usize {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.len(),
        // An incomplete character at the end (no error length) waits for
        // its other bytes, unless it cannot be a character's start anyway.
        Err(e) if e.error_len().is_none() && bytes.len() - e.valid_up_to() < 4 => e.valid_up_to(),
        Err(_) => bytes.len(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn chunks_end_on_character_boundaries() {
        let text = "é€".as_bytes(); // 2 + 3 bytes
        assert_eq!(whole_chars_len(text), 5);
        assert_eq!(whole_chars_len(&text[..1]), 0);
        assert_eq!(whole_chars_len(&text[..4]), 2);
        // Bytes that are not UTF-8 at all are passed on (shown replaced).
        assert_eq!(whole_chars_len(b"a\xffb"), 3);
    }

    #[tokio::test]
    async fn reads_plain_bz2_and_zstd_logs() {
        let dir = tempfile::tempdir().unwrap();
        let text = b"building\nerror: it broke\n";
        let plain = dir.path().join("log");
        std::fs::write(&plain, text).unwrap();
        let bz2 = dir.path().join("log.bz2");
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        enc.write_all(text).unwrap();
        std::fs::write(&bz2, enc.finish().unwrap()).unwrap();
        let zst = dir.path().join("log.zst");
        std::fs::write(&zst, zstd::encode_all(&text[..], 3).unwrap()).unwrap();
        for path in [&plain, &bz2, &zst] {
            let got = read_stored(path.to_str().unwrap()).await.unwrap();
            assert_eq!(got.as_deref(), Some(&text[..]), "{}", path.display());
        }
        // A zstd stream still being written (flushed, not finished).
        let partial = dir.path().join("running.log.zst");
        let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
        enc.write_all(b"fetching inputs\n").unwrap();
        enc.flush().unwrap();
        std::fs::write(&partial, enc.get_ref()).unwrap();
        let got = read_stored(partial.to_str().unwrap()).await.unwrap();
        assert_eq!(got.as_deref(), Some(&b"fetching inputs\n"[..]));
        let missing = dir.path().join("none.bz2");
        assert_eq!(read_stored(missing.to_str().unwrap()).await.unwrap(), None);
    }
}
