//! A helper for `BufRead` types that implement `Read` through their buffer.

use std::io::{self, BufRead};

/// Reads into `buf` from what `reader` has buffered: one `fill_buf`, a copy
/// and a `consume`. This is `Read::read` for a type whose `BufRead` does
/// the real work (counting, hashing or teeing the bytes in `consume`).
pub fn read_via_buffer<R: BufRead + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let available = reader.fill_buf()?;
    let n = available.len().min(buf.len());
    buf[..n].copy_from_slice(&available[..n]);
    reader.consume(n);
    Ok(n)
}
