//! The compressions a binary cache's NAR files come in, by the names
//! narinfos give them (`none`, `xz`, `zstd`, `bzip2`), with the file
//! extensions and default levels Nix 2.8 uses when it writes a cache.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

/// A NAR file's compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    None,
    /// Nix's default for `nix copy --to file://…`.
    #[default]
    Xz,
    Zstd,
    Bzip2,
}

/// A compression name Kiln cannot read or write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression '{0}' (expected none, xz, zstd or bzip2)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Compression, UnknownCompression> {
        match s {
            "none" | "" => Ok(Compression::None),
            "xz" => Ok(Compression::Xz),
            "zstd" => Ok(Compression::Zstd),
            "bzip2" => Ok(Compression::Bzip2),
            other => Err(UnknownCompression(other.to_owned())),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Bzip2 => "bzip2",
        })
    }
}

impl Compression {
    /// What Nix appends to `nar/<filehash>.nar`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Xz => ".xz",
            Compression::Zstd => ".zst",
            Compression::Bzip2 => ".bz2",
        }
    }

    /// The level Nix 2.8 compresses with when none is configured (xz's
    /// preset 6, zstd's 3, bzip2's 9), so caches and benchmarks compare
    /// like with like.
    pub fn default_level(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Xz => 6,
            Compression::Zstd => 3,
            Compression::Bzip2 => 9,
        }
    }

    /// A reader of the uncompressed bytes of `input`.
    pub fn decoder<'a>(
        self,
        input: Box<dyn Read + Send + 'a>,
    ) -> io::Result<Box<dyn Read + Send + 'a>> {
        Ok(match self {
            Compression::None => input,
            Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(input)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(input)?),
            Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(input)),
        })
    }

    /// A writer that compresses into `output`; `level` `None` is
    /// [`default_level`](Self::default_level).
    pub fn encoder<'a, W: Write + Send + 'a>(
        self,
        output: W,
        level: Option<u32>,
    ) -> io::Result<Encoder<'a, W>> {
        self.encoder_for_size(output, level, None)
    }

    /// [`encoder`](Self::encoder) for an input of `size` bytes, when known:
    /// xz then sizes its dictionary to the input instead of the preset's
    /// 8 MiB, which compresses exactly as well and saves allocating and
    /// clearing tens of megabytes for every small NAR.
    pub fn encoder_for_size<'a, W: Write + Send + 'a>(
        self,
        output: W,
        level: Option<u32>,
        size: Option<u64>,
    ) -> io::Result<Encoder<'a, W>> {
        let level = level.unwrap_or(self.default_level());
        Ok(match self {
            Compression::None => Encoder::Plain(output),
            Compression::Xz => {
                let mut options =
                    liblzma::stream::LzmaOptions::new_preset(level).map_err(io::Error::other)?;
                let preset_dict = options_dict_size(level);
                if let Some(size) = size {
                    // liblzma's smallest dictionary is 4 KiB.
                    let fitted = size.max(4096).next_power_of_two();
                    if fitted < u64::from(preset_dict) {
                        options.dict_size(fitted as u32);
                    }
                }
                let mut filters = liblzma::stream::Filters::new();
                filters.lzma2(&options);
                let stream = liblzma::stream::Stream::new_stream_encoder(
                    &filters,
                    liblzma::stream::Check::Crc64,
                )
                .map_err(io::Error::other)?;
                Encoder::Xz(liblzma::write::XzEncoder::new_stream(output, stream))
            }
            Compression::Zstd => {
                Encoder::Zstd(zstd::stream::write::Encoder::new(output, level as i32)?)
            }
            Compression::Bzip2 => Encoder::Bzip2(bzip2::write::BzEncoder::new(
                output,
                bzip2::Compression::new(level.clamp(1, 9)),
            )),
        })
    }
}

/// The dictionary size of xz preset `level` (0–9), as liblzma defines them.
fn options_dict_size(level: u32) -> u32 {
    const MIB: u32 = 1 << 20;
    match level {
        0 => 256 << 10,
        1 => MIB,
        2 => 2 * MIB,
        3 | 4 => 4 * MIB,
        5 | 6 => 8 * MIB,
        7 => 16 * MIB,
        8 => 32 * MIB,
        _ => 64 * MIB,
    }
}

/// A compressing writer; [`finish`](Encoder::finish) writes the trailer
/// and gives the output back.
pub enum Encoder<'a, W: Write> {
    Plain(W),
    Xz(liblzma::write::XzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'a, W>),
    Bzip2(bzip2::write::BzEncoder<W>),
}

impl<W: Write> fmt::Debug for Encoder<'_, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoder::Plain(_) => "Encoder(none)",
            Encoder::Xz(_) => "Encoder(xz)",
            Encoder::Zstd(_) => "Encoder(zstd)",
            Encoder::Bzip2(_) => "Encoder(bzip2)",
        })
    }
}

impl<W: Write> Encoder<'_, W> {
    /// Ends the compressed stream; the output, flushed.
    pub fn finish(self) -> io::Result<W> {
        let mut out = match self {
            Encoder::Plain(w) => w,
            Encoder::Xz(e) => e.finish()?,
            Encoder::Zstd(e) => e.finish()?,
            Encoder::Bzip2(e) => e.finish()?,
        };
        out.flush()?;
        Ok(out)
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Xz(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Bzip2(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Xz(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Bzip2(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for c in [
            Compression::None,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
        ] {
            assert_eq!(c.to_string().parse::<Compression>().unwrap(), c);
            let mut enc = c.encoder(Vec::new(), None).unwrap();
            enc.write_all(&data).unwrap();
            let packed = enc.finish().unwrap();
            let mut back = Vec::new();
            c.decoder(Box::new(&packed[..]))
                .unwrap()
                .read_to_end(&mut back)
                .unwrap();
            assert!(back == data, "{c} round trip");
            if c != Compression::None {
                // A truncated file is an error, never a short success.
                let mut out = Vec::new();
                let r = c
                    .decoder(Box::new(&packed[..packed.len() / 2]))
                    .unwrap()
                    .read_to_end(&mut out);
                assert!(r.is_err(), "{c}: truncated input must fail");
            }
        }
        assert!("br".parse::<Compression>().is_err());
        // A dictionary fitted to the input still decodes (by any xz).
        let mut enc = Compression::Xz
            .encoder_for_size(Vec::new(), None, Some(data.len() as u64))
            .unwrap();
        enc.write_all(&data).unwrap();
        let packed = enc.finish().unwrap();
        let mut back = Vec::new();
        Compression::Xz
            .decoder(Box::new(&packed[..]))
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
    }
}
