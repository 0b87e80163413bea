//! Fuzz target for the narinfo and `nix-cache-info` parsers
//! (`kiln_formats::narinfo`): any input must give a value or an error, never a
//! panic.
//!
//! Whatever parses must print to text that parses back to the same value and
//! prints the same again (printing is canonical: Nix's field order, sorted
//! references and signatures, defaults filled in).
#![no_main]

use kiln_formats::narinfo::{CacheInfo, NarInfo};
use kiln_formats::store_path::StoreDir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Narinfos are text; bytes that are not UTF-8 are refused before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let store = StoreDir::default();
    if let Ok(info) = NarInfo::parse(&store, text) {
        let printed = info.to_text(&store);
        let again = NarInfo::parse(&store, &printed)
            .unwrap_or_else(|e| panic!("printed narinfo does not parse: {e}\n{printed}"));
        assert_eq!(
            again, info,
            "print then parse changed the narinfo\n{printed}"
        );
        assert_eq!(again.to_text(&store), printed, "printing is not stable");
        // Fingerprinting refuses what it cannot sign; it must not panic either.
        let _ = info.fingerprint(&store);
    }
    if let Ok(cache) = CacheInfo::parse(text) {
        let printed = cache.to_text();
        let again = CacheInfo::parse(&printed)
            .unwrap_or_else(|e| panic!("printed nix-cache-info does not parse: {e}\n{printed}"));
        assert_eq!(
            again, cache,
            "print then parse changed the nix-cache-info\n{printed}"
        );
    }
});
