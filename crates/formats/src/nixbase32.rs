//! Nix's base-32 encoding: the alphabet `0-9a-z` without `e o t u`, with the
//! bytes read from the end so that the first character holds the last bits.
//!
//! ```
//! use kiln_formats::nixbase32;
//! let text = nixbase32::encode(&[0xde, 0xad, 0xbe, 0xef]);
//! assert_eq!(nixbase32::decode(&text).unwrap(), [0xde, 0xad, 0xbe, 0xef]);
//! ```

/// The 32 characters Nix uses, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

const INVALID: u8 = 0xff;

const DECODE_TABLE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a string is not nixbase32.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid character {0:?} in nixbase32 string")]
    InvalidCharacter(char),
    #[error("{0} characters is not the length of any nixbase32-encoded byte string")]
    InvalidLength(usize),
    #[error("nixbase32 string has non-zero bits past the end of its bytes")]
    TrailingBits,
}

/// The number of characters that `len` bytes encode to.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// The number of bytes that `len` characters decode to.
pub const fn decoded_len(len: usize) -> usize {
    len * 5 / 8
}

/// Whether `c` is one of the 32 characters of the alphabet.
pub fn is_valid_char(c: u8) -> bool {
    DECODE_TABLE[c as usize] != INVALID
}

/// Encodes `bytes` as Nix does.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = Vec::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
        out.push(ALPHABET[usize::from((low | high) & 0x1f)]);
    }
    // The alphabet is ASCII, so this never fails.
    String::from_utf8(out).expect("nixbase32 alphabet is ASCII")
}

/// Decodes a nixbase32 string, refusing characters outside the alphabet,
/// lengths no byte string encodes to, and set bits past the last byte.
pub fn decode(text: &str) -> Result<Vec<u8>, DecodeError> {
    let input = text.as_bytes();
    let len = decoded_len(input.len());
    if encoded_len(len) != input.len() {
        return Err(DecodeError::InvalidLength(input.len()));
    }
    let mut out = vec![0u8; len];
    for (n, &c) in input.iter().rev().enumerate() {
        let digit = DECODE_TABLE[c as usize];
        if digit == INVALID {
            // Scanning bytes backwards can land inside a multi-byte character.
            let mut at = input.len() - 1 - n;
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            let bad = text[at..].chars().next().unwrap_or('\u{fffd}');
            return Err(DecodeError::InvalidCharacter(bad));
        }
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        out[i] |= digit << j;
        let carry = (u16::from(digit) >> (8 - j)) as u8;
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(DecodeError::TrailingBits),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_values() {
        // sha256("") as Nix prints it in base32.
        let empty = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        let bytes = decode(empty).unwrap();
        assert_eq!(
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(encode(&bytes), empty);
        assert_eq!(encode(&[]), "");
        assert_eq!(encode(&[0x1f]), "0z");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("e"), Err(DecodeError::InvalidLength(1)));
        assert_eq!(decode("0e"), Err(DecodeError::InvalidCharacter('e')));
        assert_eq!(decode("zz"), Err(DecodeError::TrailingBits));
        assert_eq!(decode("0é"), Err(DecodeError::InvalidLength(3)));
    }

    proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let text = encode(&bytes);
            prop_assert_eq!(text.len(), encoded_len(bytes.len()));
            prop_assert_eq!(decode(&text).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(text in "[0-9a-z]{0,60}") {
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(encode(&bytes), text);
            }
        }
    }
}
