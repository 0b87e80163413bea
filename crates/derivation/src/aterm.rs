//! The ATerm form of a derivation: what Nix writes to a `.drv` file.
//!
//! ```text
//! Derive([("out","/nix/store/…-hello","","")],[("/nix/store/…-bash.drv",["out"])],
//!        ["/nix/store/…-builder.sh"],"x86_64-linux","/nix/store/…/bash",["-e","…"],
//!        [("name","hello"),("out","/nix/store/…-hello")])
//! ```
//!
//! Strings are quoted with `\"`, `\\`, `\n`, `\r` and `\t` escaped; every
//! other byte (UTF-8, control characters, invalid UTF-8) is written as is.
//! Printing what [`parse`] read gives back the same bytes for every file Nix
//! writes. The grammar has fixed depth, so the parser never recurses.

use std::borrow::Cow;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bstr::BString;
use kiln_formats::hash::{Hash, HashError};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathError};

use crate::derivation::{Derivation, DerivationOutput, HashMethod, OutputHash};

/// What was wrong with a `.drv` file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid derivation at byte {offset}: {kind}")]
pub struct AtermError {
    /// Byte offset into the input where the problem was found.
    pub offset: usize,
    pub kind: Box<AtermErrorKind>,
}

/// The kinds of [`AtermError`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtermErrorKind {
    #[error("expected {expected}, found {found}")]
    Expected {
        expected: &'static str,
        found: Found,
    },
    #[error("string is not terminated by '\"'")]
    UnterminatedString,
    #[error("{what} {value:?} is not valid UTF-8")]
    NotUtf8 { what: &'static str, value: BString },
    #[error("path '{0}' is not absolute")]
    NotAbsolute(String),
    #[error("bad store path: {0}")]
    BadStorePath(#[from] StorePathError),
    #[error("output '{output}' has a bad hash algorithm '{algo}': {source}")]
    BadHashAlgo {
        output: String,
        algo: String,
        source: HashError,
    },
    #[error("output '{output}' has a bad hash '{hash}': {source}")]
    BadHash {
        output: String,
        hash: String,
        source: HashError,
    },
    #[error("output '{output}' {problem}")]
    InconsistentOutput {
        output: String,
        problem: &'static str,
    },
    #[error("{what} '{key}' appears twice")]
    Duplicate { what: &'static str, key: String },
    #[error("unexpected data after the end of the derivation")]
    TrailingData,
}

/// What the parser found instead of what it expected: a byte or the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Byte(u8),
    End,
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::End => f.write_str("the end of the input"),
            Found::Byte(b) if b.is_ascii_graphic() || *b == b' ' => write!(f, "'{}'", *b as char),
            Found::Byte(b) => write!(f, "byte 0x{b:02x}"),
        }
    }
}

/// Parses the ATerm text of a `.drv` file whose paths live in `store`.
pub fn parse(store: &StoreDir, input: &[u8]) -> Result<Derivation, AtermError> {
    let mut p = Parser {
        input,
        pos: 0,
        store,
    };
    let drv = p.derivation()?;
    if p.pos != input.len() {
        return Err(p.error(AtermErrorKind::TrailingData));
    }
    Ok(drv)
}

/// Prints `drv` as Nix writes it to a `.drv` file.
pub fn print(store: &StoreDir, drv: &Derivation) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimated_len(drv));
    write(store, drv, &mut out, Mode::Plain);
    out
}

/// Variations of the printed form used when hashing a derivation modulo its
/// inputs (see [`crate::hash_modulo`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Mode<'a> {
    /// What Nix writes to disk.
    Plain,
    /// Input derivations are replaced by their hashes modulo (`inputs`),
    /// and with `mask_outputs` the output paths and the environment
    /// variables named after outputs are blanked.
    Hashing {
        mask_outputs: bool,
        inputs: &'a BTreeMap<String, BTreeSet<String>>,
    },
}

fn estimated_len(drv: &Derivation) -> usize {
    let env: usize = drv.env.iter().map(|(k, v)| k.len() + v.len() + 8).sum();
    let args: usize = drv.args.iter().map(|a| a.len() + 3).sum();
    64 + env
        + args
        + drv.outputs.len() * 100
        + drv.input_derivations.len() * 80
        + drv.input_sources.len() * 70
        + drv.builder.len()
}

pub(crate) fn write(store: &StoreDir, drv: &Derivation, out: &mut Vec<u8>, mode: Mode<'_>) {
    let mask = matches!(
        mode,
        Mode::Hashing {
            mask_outputs: true,
            ..
        }
    );
    out.extend_from_slice(b"Derive([");
    for (i, (name, output)) in drv.outputs.iter().enumerate() {
        comma(out, i);
        out.push(b'(');
        write_string(out, name.as_bytes());
        out.push(b',');
        let (path, algo, hash) = match output {
            DerivationOutput::InputAddressed { path } => (Some(path), String::new(), String::new()),
            DerivationOutput::Fixed { hash, path } => {
                (Some(path), hash.method_algo(), hash.hash.to_base16())
            }
            DerivationOutput::Floating { method, algo } => {
                (None, method.with_algo(*algo), String::new())
            }
            DerivationOutput::Deferred => (None, String::new(), String::new()),
            DerivationOutput::Impure { method, algo } => {
                (None, method.with_algo(*algo), "impure".to_owned())
            }
        };
        match path {
            Some(path) if !mask => write_path(out, store, path),
            _ => out.extend_from_slice(b"\"\""),
        }
        out.push(b',');
        write_string(out, algo.as_bytes());
        out.push(b',');
        write_string(out, hash.as_bytes());
        out.push(b')');
    }
    out.extend_from_slice(b"],[");
    match mode {
        Mode::Hashing { inputs, .. } => {
            for (i, (hash, outputs)) in inputs.iter().enumerate() {
                comma(out, i);
                out.push(b'(');
                write_string(out, hash.as_bytes());
                out.push(b',');
                write_string_list(out, outputs.iter().map(|s| s.as_bytes()));
                out.push(b')');
            }
        }
        Mode::Plain => {
            for (i, (path, outputs)) in drv.input_derivations.iter().enumerate() {
                comma(out, i);
                out.push(b'(');
                write_path(out, store, path);
                out.push(b',');
                write_string_list(out, outputs.iter().map(|s| s.as_bytes()));
                out.push(b')');
            }
        }
    }
    out.extend_from_slice(b"],[");
    for (i, path) in drv.input_sources.iter().enumerate() {
        comma(out, i);
        write_path(out, store, path);
    }
    out.extend_from_slice(b"],");
    write_string(out, &drv.system);
    out.push(b',');
    write_string(out, &drv.builder);
    out.push(b',');
    write_string_list(out, drv.args.iter().map(|a| a.as_slice()));
    out.extend_from_slice(b",[");
    for (i, (key, value)) in drv.env.iter().enumerate() {
        comma(out, i);
        out.push(b'(');
        write_string(out, key);
        out.push(b',');
        let masked = mask && std::str::from_utf8(key).is_ok_and(|k| drv.outputs.contains_key(k));
        write_string(out, if masked { b"" } else { value.as_slice() });
        out.push(b')');
    }
    out.extend_from_slice(b"])");
}

fn comma(out: &mut Vec<u8>, index: usize) {
    if index > 0 {
        out.push(b',');
    }
}

fn write_path(out: &mut Vec<u8>, store: &StoreDir, path: &StorePath) {
    // Store paths contain no character that needs escaping.
    out.push(b'"');
    out.extend_from_slice(store.as_str().as_bytes());
    out.push(b'/');
    out.extend_from_slice(path.base_name().as_bytes());
    out.push(b'"');
}

fn write_string_list<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        comma(out, i);
        write_string(out, item);
    }
    out.push(b']');
}

/// Writes `s` quoted, escaping as Nix does.
pub(crate) fn write_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut rest = s;
    while let Some(i) = rest.iter().position(|&b| needs_escape(b)) {
        out.extend_from_slice(&rest[..i]);
        out.push(b'\\');
        out.push(match rest[i] {
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            other => other,
        });
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn needs_escape(b: u8) -> bool {
    matches!(b, b'"' | b'\\' | b'\n' | b'\r' | b'\t')
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    store: &'a StoreDir,
}

type Result<T, E = AtermError> = std::result::Result<T, E>;

impl<'a> Parser<'a> {
    fn error(&self, kind: AtermErrorKind) -> AtermError {
        AtermError {
            offset: self.pos,
            kind: Box::new(kind),
        }
    }

    fn error_at(&self, offset: usize, kind: AtermErrorKind) -> AtermError {
        AtermError {
            offset,
            kind: Box::new(kind),
        }
    }

    fn found(&self) -> Found {
        match self.input.get(self.pos) {
            Some(&b) => Found::Byte(b),
            None => Found::End,
        }
    }

    fn expected(&self, expected: &'static str) -> AtermError {
        self.error(AtermErrorKind::Expected {
            expected,
            found: self.found(),
        })
    }

    /// Consumes `lit`, or fails pointing at the first byte that differs.
    fn expect(&mut self, lit: &'static str) -> Result<()> {
        for &b in lit.as_bytes() {
            if self.input.get(self.pos) != Some(&b) {
                return Err(self.expected(lit));
            }
            self.pos += 1;
        }
        Ok(())
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.input.get(self.pos) == Some(&b) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    /// Parses `[item,item,…]`, calling `item` for each element.
    fn list(&mut self, mut item: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect("[")?;
        if self.eat(b']') {
            return Ok(());
        }
        loop {
            item(self)?;
            if self.eat(b']') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(self.expected("',' or ']'"));
            }
        }
    }

    /// Parses a quoted string; borrows from the input unless it has escapes.
    fn string(&mut self) -> Result<Cow<'a, [u8]>> {
        if !self.eat(b'"') {
            return Err(self.expected("'\"' (a string)"));
        }
        let start = self.pos;
        let input: &'a [u8] = self.input;
        let Some(end) = memchr::memchr2(b'"', b'\\', &input[start..]) else {
            return Err(self.error_at(start - 1, AtermErrorKind::UnterminatedString));
        };
        if input[start + end] == b'"' {
            self.pos = start + end + 1;
            return Ok(Cow::Borrowed(&input[start..start + end]));
        }
        let mut owned = Vec::with_capacity(end + 16);
        let mut pos = start;
        loop {
            let Some(i) = memchr::memchr2(b'"', b'\\', &input[pos..]) else {
                return Err(self.error_at(start - 1, AtermErrorKind::UnterminatedString));
            };
            owned.extend_from_slice(&input[pos..pos + i]);
            pos += i;
            if input[pos] == b'"' {
                self.pos = pos + 1;
                return Ok(Cow::Owned(owned));
            }
            let Some(&escaped) = input.get(pos + 1) else {
                return Err(self.error_at(start - 1, AtermErrorKind::UnterminatedString));
            };
            owned.push(match escaped {
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                other => other,
            });
            pos += 2;
        }
    }

    fn utf8_string(&mut self, what: &'static str) -> Result<(usize, String)> {
        let start = self.pos;
        let bytes = self.string()?;
        match String::from_utf8(bytes.into_owned()) {
            Ok(s) => Ok((start, s)),
            Err(e) => Err(self.error_at(
                start,
                AtermErrorKind::NotUtf8 {
                    what,
                    value: e.into_bytes().into(),
                },
            )),
        }
    }

    fn store_path(&mut self) -> Result<StorePath> {
        let (start, s) = self.utf8_string("path")?;
        self.to_store_path(start, &s)
    }

    fn to_store_path(&self, start: usize, s: &str) -> Result<StorePath> {
        if !s.starts_with('/') {
            return Err(self.error_at(start, AtermErrorKind::NotAbsolute(s.to_owned())));
        }
        self.store
            .parse_path(s)
            .map_err(|e| self.error_at(start, e.into()))
    }

    fn derivation(&mut self) -> Result<Derivation> {
        let mut drv = Derivation::default();
        self.expect("Derive(")?;
        self.list(|p| {
            let (start, name, output) = p.output()?;
            if drv.outputs.insert(name.clone(), output).is_some() {
                return Err(p.error_at(
                    start,
                    AtermErrorKind::Duplicate {
                        what: "output",
                        key: name,
                    },
                ));
            }
            Ok(())
        })?;
        self.expect(",")?;
        self.list(|p| {
            let start = p.pos;
            p.expect("(")?;
            let path = p.store_path()?;
            p.expect(",")?;
            let mut outputs = BTreeSet::new();
            p.list(|p| {
                let (start, name) = p.utf8_string("output name")?;
                if !outputs.insert(name.clone()) {
                    return Err(p.error_at(
                        start,
                        AtermErrorKind::Duplicate {
                            what: "input output name",
                            key: name,
                        },
                    ));
                }
                Ok(())
            })?;
            p.expect(")")?;
            if drv.input_derivations.contains_key(&path) {
                return Err(p.error_at(
                    start,
                    AtermErrorKind::Duplicate {
                        what: "input derivation",
                        key: path.to_string(),
                    },
                ));
            }
            drv.input_derivations.insert(path, outputs);
            Ok(())
        })?;
        self.expect(",")?;
        self.list(|p| {
            let start = p.pos;
            let path = p.store_path()?;
            if !drv.input_sources.insert(path.clone()) {
                return Err(p.error_at(
                    start,
                    AtermErrorKind::Duplicate {
                        what: "input source",
                        key: path.to_string(),
                    },
                ));
            }
            Ok(())
        })?;
        self.expect(",")?;
        drv.system = self.string()?.into_owned().into();
        self.expect(",")?;
        drv.builder = self.string()?.into_owned().into();
        self.expect(",")?;
        self.list(|p| {
            drv.args.push(p.string()?.into_owned().into());
            Ok(())
        })?;
        self.expect(",")?;
        self.list(|p| {
            let start = p.pos;
            p.expect("(")?;
            let key = BString::from(p.string()?.into_owned());
            p.expect(",")?;
            let value = BString::from(p.string()?.into_owned());
            p.expect(")")?;
            match drv.env.entry(key) {
                Entry::Vacant(entry) => {
                    entry.insert(value);
                    Ok(())
                }
                Entry::Occupied(entry) => Err(p.error_at(
                    start,
                    AtermErrorKind::Duplicate {
                        what: "environment variable",
                        key: entry.key().to_string(),
                    },
                )),
            }
        })?;
        self.expect(")")?;
        Ok(drv)
    }

    /// Parses `("name","path","hashAlgo","hash")`.
    fn output(&mut self) -> Result<(usize, String, DerivationOutput)> {
        self.expect("(")?;
        let (start, name) = self.utf8_string("output name")?;
        self.expect(",")?;
        let (path_start, path) = self.utf8_string("output path")?;
        self.expect(",")?;
        let (algo_start, algo) = self.utf8_string("output hash algorithm")?;
        self.expect(",")?;
        let (hash_start, hash) = self.utf8_string("output hash")?;
        self.expect(")")?;
        let inconsistent = |offset, problem| {
            self.error_at(
                offset,
                AtermErrorKind::InconsistentOutput {
                    output: name.clone(),
                    problem,
                },
            )
        };
        let output = if algo.is_empty() {
            if !hash.is_empty() {
                return Err(inconsistent(hash_start, "has a hash but no hash algorithm"));
            }
            if path.is_empty() {
                DerivationOutput::Deferred
            } else {
                DerivationOutput::InputAddressed {
                    path: self.to_store_path(path_start, &path)?,
                }
            }
        } else {
            let (method, hash_algo) = HashMethod::parse_with_algo(&algo).map_err(|source| {
                self.error_at(
                    algo_start,
                    AtermErrorKind::BadHashAlgo {
                        output: name.clone(),
                        algo: algo.clone(),
                        source,
                    },
                )
            })?;
            if (hash.is_empty() || hash == "impure") && !path.is_empty() {
                return Err(inconsistent(
                    path_start,
                    "has a path but its content hash is not known in advance",
                ));
            }
            if hash == "impure" {
                DerivationOutput::Impure {
                    method,
                    algo: hash_algo,
                }
            } else if hash.is_empty() {
                DerivationOutput::Floating {
                    method,
                    algo: hash_algo,
                }
            } else {
                let parsed = Hash::parse_bare(&hash, hash_algo).map_err(|source| {
                    self.error_at(
                        hash_start,
                        AtermErrorKind::BadHash {
                            output: name.clone(),
                            hash: hash.clone(),
                            source,
                        },
                    )
                })?;
                DerivationOutput::Fixed {
                    hash: OutputHash {
                        method,
                        hash: parsed,
                    },
                    path: self.to_store_path(path_start, &path)?,
                }
            }
        };
        Ok((start, name, output))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> StoreDir {
        StoreDir::default()
    }

    const HELLO: &str = r#"Derive([("dev","/nix/store/0c1x5r6qvx7ly4nl1jvk0qqzlbkqqbmc-hello-dev","",""),("out","/nix/store/1h5n1rxl1ac9jiiwbdfvsrzr2xzhm3fa-hello","","")],[("/nix/store/9krlzvny65gdc8s7kpb6lkx8cd02c25b-bash-5.1.drv",["out"]),("/nix/store/a8ivbrgqjlb8x3xsw6s60kg0nx4dxc73-stdenv.drv",["dev","out"])],["/nix/store/6ym6ljjyz1p49xxa1pq0p4kzi2gp9i0q-builder.sh"],"x86_64-linux","/bin/sh",["-e","a\"b\\c\nd\te\rf"],[("","empty key"),("name","hello"),("out","/nix/store/1h5n1rxl1ac9jiiwbdfvsrzr2xzhm3fa-hello"),("unicode","ü → ∀ 🦀"),("x","")])"#;

    #[test]
    fn round_trips_byte_for_byte() {
        let drv = parse(&store(), HELLO.as_bytes()).unwrap();
        assert_eq!(drv.outputs.len(), 2);
        assert_eq!(drv.args[1], "a\"b\\c\nd\te\rf");
        assert_eq!(drv.env[&BString::from("unicode")], "ü → ∀ 🦀");
        assert_eq!(
            drv.input_derivations.values().nth(1).unwrap().len(),
            2,
            "two outputs of stdenv"
        );
        assert_eq!(String::from_utf8(print(&store(), &drv)).unwrap(), HELLO);
    }

    #[test]
    fn control_and_invalid_utf8_bytes_pass_verbatim() {
        let text = b"Derive([],[],[],\"\x01\x7f\xff\",\"\",[],[(\"k\",\"\\x\xc3\")])";
        let drv = parse(&store(), text).unwrap();
        assert_eq!(drv.system.as_slice(), b"\x01\x7f\xff");
        // An escaped ordinary byte is read as that byte, as Nix does.
        assert_eq!(drv.env[&BString::from("k")].as_slice(), b"x\xc3");
        assert_eq!(
            print(&store(), &drv),
            b"Derive([],[],[],\"\x01\x7f\xff\",\"\",[],[(\"k\",\"x\xc3\")])"
        );
    }

    #[test]
    fn output_kinds() {
        let text = r#"Derive([("a","","r:sha256",""),("b","",""," "),("c","","",""),("d","","sha256","impure"),("out","/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo","r:sha256","0000000000000000000000000000000000000000000000000000000000000000")],[],[],"s","b",[],[])"#;
        let err = parse(&store(), text.as_bytes()).unwrap_err();
        assert!(
            matches!(*err.kind, AtermErrorKind::InconsistentOutput { .. }),
            "{err}"
        );
        let bad_algo = text.replace(r#"("b","",""," ")"#, r#"("b","","md4","")"#);
        let err = parse(&store(), bad_algo.as_bytes()).unwrap_err();
        assert!(
            matches!(*err.kind, AtermErrorKind::BadHashAlgo { .. }),
            "{err}"
        );
        let text = text.replace(r#"("b","",""," "),"#, "");
        let drv = parse(&store(), text.as_bytes()).unwrap();
        assert!(matches!(
            drv.outputs["a"],
            DerivationOutput::Floating {
                method: HashMethod::Recursive,
                ..
            }
        ));
        assert_eq!(drv.outputs["c"], DerivationOutput::Deferred);
        assert!(matches!(
            drv.outputs["d"],
            DerivationOutput::Impure {
                method: HashMethod::Flat,
                ..
            }
        ));
        assert!(matches!(drv.outputs["out"], DerivationOutput::Fixed { .. }));
        assert_eq!(String::from_utf8(print(&store(), &drv)).unwrap(), text);
    }

    #[test]
    fn errors_say_where_and_what() {
        let cases: &[(&[u8], usize, &str)] = &[
            (b"", 0, "expected Derive("),
            (b"Derive(x", 7, "expected [, found 'x'"),
            (b"Derive([(\"out", 9, "not terminated"),
            (b"Derive([(\"out\",\"x\",\"\",\"\")]", 15, "not absolute"),
            (
                b"Derive([(\"out\",\"/nix/store/abc\",\"\",\"\")]",
                15,
                "bad store path",
            ),
            (b"Derive([],[],[],\"\",\"\",[],[]) ", 28, "after the end"),
            (
                b"Derive([],[],[],\"\",\"\",[\"a\" \"b\"],[])",
                26,
                "',' or ']'",
            ),
            (
                b"Derive([],[],[],\"\",\"\",[],[(\"a\",\"\"),(\"a\",\"\")])",
                35,
                "environment variable 'a' appears twice",
            ),
        ];
        for (input, offset, message) in cases {
            let err = parse(&store(), input).unwrap_err();
            assert_eq!(err.offset, *offset, "{err}");
            assert!(err.to_string().contains(message), "{err} / {message}");
        }
    }

    #[test]
    fn truncations_of_a_real_derivation_are_errors_not_panics() {
        for len in 0..HELLO.len() {
            assert!(parse(&store(), &HELLO.as_bytes()[..len]).is_err());
        }
    }

    #[test]
    fn other_store_directory() {
        let store = StoreDir::new("/gnu/store").unwrap();
        let text = r#"Derive([("out","/gnu/store/1h5n1rxl1ac9jiiwbdfvsrzr2xzhm3fa-hello","","")],[],[],"s","b",[],[])"#;
        let drv = parse(&store, text.as_bytes()).unwrap();
        assert_eq!(print(&store, &drv), text.as_bytes());
        assert!(parse(&StoreDir::default(), text.as_bytes()).is_err());
    }
}
