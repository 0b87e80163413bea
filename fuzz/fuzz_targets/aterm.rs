//! Fuzz target for the ATerm `.drv` parser (`kiln_derivation`): any input must give a value or an error, never a panic.
//!
//! PLACEHOLDER so that the fuzz project builds while the parser is being written:
//! the helper who writes the parser replaces this body with a call that feeds
//! `data` to it (and, where the parse succeeds, checks that printing round-trips).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::hint::black_box(data);
});
