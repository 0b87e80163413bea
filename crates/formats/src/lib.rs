//! Nix-compatible wire and on-disk formats, with no knowledge of stores or builds.
//!
//! Everything here agrees with Nix byte for byte: [`nixbase32`], [`hash`] (parse
//! and print in base16, nixbase32, base64 and SRI), [`store_path`] (store
//! directories as a parameter, path validation and computation), [`nar`]
//! (archives: write, read, restore), [`narinfo`] and [`signature`] (ed25519 in
//! Nix's `name:base64` form); [`report`] prints an error chain for people;
//! [`bufread`] has a small helper for readers.
//!
//! ```
//! use kiln_formats::hash::{Hash, HashAlgo};
//! use kiln_formats::store_path::StoreDir;
//!
//! let store = StoreDir::default();
//! let path = store.parse_path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1")?;
//! assert_eq!(path.name(), "hello-2.12.1");
//! let digest = Hash::digest(HashAlgo::Sha256, b"hello");
//! assert!(digest.to_sri().starts_with("sha256-"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariant: this crate does no I/O except on the readers, writers and paths
//! it is given.

pub mod bufread;
pub mod content_address;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod report;
pub mod signature;
pub mod store_path;
