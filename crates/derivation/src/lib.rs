//! Nix derivations: the [`Derivation`] value, its ATerm (`.drv`) and JSON
//! forms, hash modulo and output paths, and the build options a builder
//! reads from it.
//!
//! ```
//! use kiln_derivation::{aterm, hash_modulo, Derivation};
//! use kiln_formats::store_path::StoreDir;
//!
//! let store = StoreDir::default();
//! let text = br#"Derive([("out","","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo hi > $out"],[("name","hi"),("out","")])"#;
//! let mut drv: Derivation = aterm::parse(&store, text)?;
//! // No input derivations, so the lookup of their hashes is never called.
//! hash_modulo::fill_in_output_paths(&store, &mut drv, "hi", |_| {
//!     Err::<kiln_formats::hash::Hash, _>(std::io::Error::other("no inputs"))
//! })?;
//! let out = drv.outputs["out"].path().unwrap();
//! assert!(store.print_path(out).ends_with("-hi"));
//! let drv_path = hash_modulo::drv_path(&store, &drv, "hi")?;
//! assert_eq!(drv_path.name(), "hi.drv");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariant: this crate does no I/O except [`hash_modulo::DrvFileHashes`],
//! which reads the `.drv` files it is pointed at.

pub mod aterm;
pub mod derivation;
pub mod hash_modulo;
pub mod json;
pub mod options;

/// The byte strings [`Derivation`] holds its free-form text in.
pub use bstr::{self, BStr, BString};
pub use derivation::{Derivation, DerivationOutput, HashMethod, OutputHash, drv_name};
pub use options::BuildOptions;
