//! Fuzz target for the ATerm `.drv` parser (`kiln_derivation::aterm`): any
//! input gives a derivation or an error, never a panic; and whatever parses
//! prints to text that parses back to the same derivation, and prints the
//! same again.
#![no_main]

use kiln_derivation::aterm;
use kiln_formats::store_path::StoreDir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = StoreDir::default();
    if let Ok(drv) = aterm::parse(&store, data) {
        let printed = aterm::print(&store, &drv);
        let reparsed = aterm::parse(&store, &printed).expect("printed derivation must parse");
        assert_eq!(reparsed, drv);
        assert_eq!(aterm::print(&store, &reparsed), printed);
    }
});
