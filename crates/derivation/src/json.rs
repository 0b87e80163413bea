//! The JSON form of derivations: printed exactly as Nix 2.8's
//! `nix show-derivation` prints it, and read back from that form or from the
//! newer `nix derivation show` ones (format versions 2 to 4: `method` apart
//! from `hashAlgo`, store paths as base names, `inputs.srcs`/`inputs.drvs`,
//! a `structuredAttrs` object; output paths and the environment may be
//! missing, to be filled in by [`crate::hash_modulo::fill_in_output_paths`]).
//!
//! ```json
//! {
//!   "/nix/store/…-hello.drv": {
//!     "outputs": { "out": { "path": "/nix/store/…-hello" } },
//!     "inputSrcs": [], "inputDrvs": {}, "system": "x86_64-linux",
//!     "builder": "/bin/sh", "args": [], "env": { … }
//!   }
//! }
//! ```

use std::collections::{BTreeMap, BTreeSet};

use bstr::BString;
use kiln_formats::hash::{Hash, HashAlgo, HashError};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathError};
use serde_json::Value;

use crate::derivation::{Derivation, DerivationOutput, HashMethod, OutputHash, drv_name};

/// What was wrong with a JSON derivation, and where (a JSON path such as
/// `/nix/store/…drv.outputs.out.hash`).
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    #[error("invalid JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    #[error("{at}: expected {expected}, found {found}")]
    WrongType {
        at: String,
        expected: &'static str,
        found: String,
    },
    #[error("{at}: missing key '{key}'")]
    Missing { at: String, key: &'static str },
    #[error("{at}: bad store path: {source}")]
    BadStorePath { at: String, source: StorePathError },
    #[error("{at}: bad hash or hash algorithm: {source}")]
    BadHash { at: String, source: HashError },
    #[error("{at}: {message}")]
    Invalid { at: String, message: String },
    #[error(
        "{at}: the output path must be computed but the derivation's name is unknown \
         (give a 'name' key, key it by its .drv path, or set env.name)"
    )]
    UnknownName { at: String },
}

/// One derivation read from JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonDerivation {
    /// The `.drv` path it was keyed by, in Nix 2.8's form.
    pub drv_path: Option<StorePath>,
    /// The derivation's name, from the `name` key of newer JSON, the `.drv`
    /// path, or `env.name`, in that order.
    pub name: Option<String>,
    pub derivation: Derivation,
}

/// Prints derivations as Nix 2.8's `nix show-derivation` does, byte for
/// byte (without the final newline): an object keyed by `.drv` path, sorted
/// by path, two-space indentation, keys in Nix's order.
pub fn print<'a>(
    store: &StoreDir,
    drvs: impl IntoIterator<Item = (&'a StorePath, &'a Derivation)>,
) -> Vec<u8> {
    let sorted: BTreeMap<&StorePath, &Derivation> = drvs.into_iter().collect();
    let mut w = Writer::default();
    w.open(b'{');
    for (path, drv) in sorted {
        w.key(store.print_path(path).as_bytes());
        write_derivation(&mut w, store, drv);
    }
    w.close(b'}');
    w.out
}

/// Prints one derivation's JSON object (the value under its path).
pub fn print_one(store: &StoreDir, drv: &Derivation) -> Vec<u8> {
    let mut w = Writer::default();
    write_derivation(&mut w, store, drv);
    w.out
}

fn write_derivation(w: &mut Writer, store: &StoreDir, drv: &Derivation) {
    w.open(b'{');
    w.key(b"outputs");
    w.open(b'{');
    for (name, output) in &drv.outputs {
        w.key(name.as_bytes());
        w.open(b'{');
        match output {
            DerivationOutput::InputAddressed { path } => {
                w.key(b"path");
                w.string(store.print_path(path).as_bytes());
            }
            DerivationOutput::Fixed { hash, path } => {
                w.key(b"path");
                w.string(store.print_path(path).as_bytes());
                w.key(b"hashAlgo");
                w.string(hash.method_algo().as_bytes());
                w.key(b"hash");
                w.string(hash.hash.to_base16().as_bytes());
            }
            DerivationOutput::Floating { method, algo } => {
                w.key(b"hashAlgo");
                w.string(method.with_algo(*algo).as_bytes());
            }
            DerivationOutput::Deferred => {}
            DerivationOutput::Impure { method, algo } => {
                w.key(b"hashAlgo");
                w.string(method.with_algo(*algo).as_bytes());
                w.key(b"impure");
                w.raw(b"true");
            }
        }
        w.close(b'}');
    }
    w.close(b'}');
    w.key(b"inputSrcs");
    w.open(b'[');
    for path in &drv.input_sources {
        w.item();
        w.string(store.print_path(path).as_bytes());
    }
    w.close(b']');
    w.key(b"inputDrvs");
    w.open(b'{');
    for (path, outputs) in &drv.input_derivations {
        w.key(store.print_path(path).as_bytes());
        w.open(b'[');
        for output in outputs {
            w.item();
            w.string(output.as_bytes());
        }
        w.close(b']');
    }
    w.close(b'}');
    w.key(b"system");
    w.string(&drv.system);
    w.key(b"builder");
    w.string(&drv.builder);
    w.key(b"args");
    w.open(b'[');
    for arg in &drv.args {
        w.item();
        w.string(arg);
    }
    w.close(b']');
    w.key(b"env");
    w.open(b'{');
    for (key, value) in &drv.env {
        w.key(key);
        w.string(value);
    }
    w.close(b'}');
    w.close(b'}');
}

/// A pretty-printer with Nix 2.8's layout: a newline and two spaces per
/// level before each member, `[]`/`{}` when empty, and strings escaped as
/// Nix escapes them (bytes that are not control characters pass verbatim).
#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    /// Per open container: has it had a member yet?
    nonempty: Vec<bool>,
}

impl Writer {
    fn open(&mut self, bracket: u8) {
        self.out.push(bracket);
        self.nonempty.push(false);
    }

    fn close(&mut self, bracket: u8) {
        if self.nonempty.pop().expect("balanced") {
            self.newline();
        }
        self.out.push(bracket);
    }

    fn newline(&mut self) {
        self.out.push(b'\n');
        for _ in 0..self.nonempty.len() {
            self.out.extend_from_slice(b"  ");
        }
    }

    fn item(&mut self) {
        let last = self.nonempty.last_mut().expect("inside a container");
        if std::mem::replace(last, true) {
            self.out.push(b',');
        }
        self.newline();
    }

    fn key(&mut self, key: &[u8]) {
        self.item();
        self.string(key);
        self.out.extend_from_slice(b": ");
    }

    fn raw(&mut self, text: &[u8]) {
        self.out.extend_from_slice(text);
    }

    fn string(&mut self, s: &[u8]) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.out.push(b'"');
        for &b in s {
            match b {
                b'"' | b'\\' => self.out.extend_from_slice(&[b'\\', b]),
                b'\n' => self.out.extend_from_slice(b"\\n"),
                b'\r' => self.out.extend_from_slice(b"\\r"),
                b'\t' => self.out.extend_from_slice(b"\\t"),
                0..=0x1f => self.out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xf)],
                ]),
                _ => self.out.push(b),
            }
        }
        self.out.push(b'"');
    }
}

/// Reads derivations from JSON: either an object keyed by `.drv` path (what
/// `nix show-derivation` prints) or a single derivation object.
pub fn parse(store: &StoreDir, text: &str) -> Result<Vec<JsonDerivation>, JsonError> {
    let value: Value = serde_json::from_str(text)?;
    parse_value(store, &value)
}

/// Like [`parse`], from an already parsed JSON value.
pub fn parse_value(store: &StoreDir, value: &Value) -> Result<Vec<JsonDerivation>, JsonError> {
    let obj = as_object(value, "the top level")?;
    // No store path is named "outputs", so this cannot be a map of derivations.
    let is_single = obj.contains_key("outputs");
    if is_single {
        return Ok(vec![parse_derivation(
            store,
            None,
            value,
            "the derivation",
        )?]);
    }
    obj.iter()
        .map(|(key, value)| {
            let path = parse_path_text(store, key, key)?;
            parse_derivation(store, Some(path), value, key)
        })
        .collect()
}

/// Reads one derivation object; `drv_path` is the key it was found under.
pub fn parse_derivation(
    store: &StoreDir,
    drv_path: Option<StorePath>,
    value: &Value,
    at: &str,
) -> Result<JsonDerivation, JsonError> {
    let obj = as_object(value, at)?;
    let field = |key: &str| format!("{at}.{key}");
    let mut drv = Derivation::default();

    if let Some(env) = present(obj, "env") {
        for (key, value) in as_object(env, &field("env"))? {
            let value = as_str(value, &format!("{at}.env.{key}"))?;
            drv.env.insert(key.as_str().into(), value.into());
        }
    }
    // Version 4 gives structured attributes as an object rather than as the
    // `__json` string the builder gets; Nix writes that string compact, with
    // sorted keys, as serde_json does.
    if let Some(attrs) = present(obj, "structuredAttrs") {
        as_object(attrs, &field("structuredAttrs"))?;
        drv.env
            .insert("__json".into(), serde_json::to_string(attrs)?.into());
    }
    let name = match present(obj, "name") {
        Some(name) => Some(as_str(name, &field("name"))?.to_owned()),
        None => drv_path
            .as_ref()
            .and_then(drv_name)
            .map(str::to_owned)
            .or_else(|| drv.env_str("name").map(str::to_owned)),
    };

    for (key, value) in as_object(required(obj, "outputs", at)?, &field("outputs"))? {
        let at = format!("{at}.outputs.{key}");
        let output = parse_output(store, value, &at, name.as_deref(), key)?;
        drv.outputs.insert(key.clone(), output);
    }
    // Version 4 nests the inputs: `inputs.srcs`, `inputs.drvs`.
    let (srcs, drvs, srcs_at, drvs_at) = match present(obj, "inputs") {
        Some(inputs) => {
            let inputs = as_object(inputs, &field("inputs"))?;
            (
                present(inputs, "srcs"),
                present(inputs, "drvs"),
                field("inputs.srcs"),
                field("inputs.drvs"),
            )
        }
        None => (
            present(obj, "inputSrcs"),
            present(obj, "inputDrvs"),
            field("inputSrcs"),
            field("inputDrvs"),
        ),
    };
    if let Some(srcs) = srcs {
        for (i, src) in as_array(srcs, &srcs_at)?.iter().enumerate() {
            let at = format!("{srcs_at}[{i}]");
            drv.input_sources.insert(parse_path(store, src, &at)?);
        }
    }
    if let Some(drvs) = drvs {
        for (key, value) in as_object(drvs, &drvs_at)? {
            let at = format!("{drvs_at}.{key}");
            let path = parse_path_text(store, key, &at)?;
            // Newer Nix writes `{"outputs": […], "dynamicOutputs": {}}`.
            let list = match value {
                Value::Object(o) => {
                    if o.get("dynamicOutputs")
                        .is_some_and(|d| d.as_object().is_none_or(|d| !d.is_empty()))
                    {
                        return Err(JsonError::Invalid {
                            at,
                            message: "dynamic derivation outputs are not supported".into(),
                        });
                    }
                    required(o, "outputs", &at)?
                }
                other => other,
            };
            let outputs = as_array(list, &at)?
                .iter()
                .map(|o| as_str(o, &at).map(str::to_owned))
                .collect::<Result<BTreeSet<_>, _>>()?;
            drv.input_derivations.insert(path, outputs);
        }
    }
    drv.system = as_str(required(obj, "system", at)?, &field("system"))?.into();
    drv.builder = as_str(required(obj, "builder", at)?, &field("builder"))?.into();
    if let Some(args) = present(obj, "args") {
        for (i, arg) in as_array(args, &field("args"))?.iter().enumerate() {
            drv.args
                .push(BString::from(as_str(arg, &format!("{at}.args[{i}]"))?));
        }
    }
    Ok(JsonDerivation {
        drv_path,
        name,
        derivation: drv,
    })
}

fn parse_output(
    store: &StoreDir,
    value: &Value,
    at: &str,
    drv_name: Option<&str>,
    output_name: &str,
) -> Result<DerivationOutput, JsonError> {
    let obj = as_object(value, at)?;
    let text = |key: &str| -> Result<Option<&str>, JsonError> {
        present(obj, key)
            .map(|v| as_str(v, &format!("{at}.{key}")))
            .transpose()
            .map(|s| s.filter(|s| !s.is_empty()))
    };
    let path = match text("path")? {
        Some(p) => Some(parse_path_text(store, p, &format!("{at}.path"))?),
        None => None,
    };
    let Some(algo_text) = text("hashAlgo")? else {
        return Ok(match path {
            Some(path) => DerivationOutput::InputAddressed { path },
            None => DerivationOutput::Deferred,
        });
    };
    let bad_hash = |source| JsonError::BadHash {
        at: format!("{at}.hashAlgo"),
        source,
    };
    // Nix 2.8 writes "r:sha256"; newer Nix writes "sha256" and the method
    // apart ("nar", "flat", "text").
    let (method, algo): (HashMethod, HashAlgo) = match text("method")? {
        Some(method) => (
            method.parse().map_err(|message| JsonError::Invalid {
                at: format!("{at}.method"),
                message,
            })?,
            algo_text.parse().map_err(bad_hash)?,
        ),
        None => HashMethod::parse_with_algo(algo_text).map_err(bad_hash)?,
    };
    if obj.get("impure").and_then(Value::as_bool) == Some(true) {
        return Ok(DerivationOutput::Impure { method, algo });
    }
    let Some(hash_text) = text("hash")? else {
        return Ok(DerivationOutput::Floating { method, algo });
    };
    let hash = Hash::parse_any(hash_text, Some(algo)).map_err(|source| JsonError::BadHash {
        at: format!("{at}.hash"),
        source,
    })?;
    let hash = OutputHash { method, hash };
    let path = match path {
        Some(path) => path,
        None => {
            let name = drv_name.ok_or_else(|| JsonError::UnknownName { at: at.to_owned() })?;
            hash.store_path(store, name, output_name)
                .map_err(|source| JsonError::BadStorePath {
                    at: at.to_owned(),
                    source,
                })?
        }
    };
    Ok(DerivationOutput::Fixed { hash, path })
}

fn type_name(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn wrong(value: &Value, at: &str, expected: &'static str) -> JsonError {
    JsonError::WrongType {
        at: at.to_owned(),
        expected,
        found: type_name(value),
    }
}

fn as_object<'v>(
    value: &'v Value,
    at: &str,
) -> Result<&'v serde_json::Map<String, Value>, JsonError> {
    value
        .as_object()
        .ok_or_else(|| wrong(value, at, "an object"))
}

fn as_array<'v>(value: &'v Value, at: &str) -> Result<&'v Vec<Value>, JsonError> {
    value.as_array().ok_or_else(|| wrong(value, at, "an array"))
}

fn as_str<'v>(value: &'v Value, at: &str) -> Result<&'v str, JsonError> {
    value.as_str().ok_or_else(|| wrong(value, at, "a string"))
}

fn required<'v>(
    obj: &'v serde_json::Map<String, Value>,
    key: &'static str,
    at: &str,
) -> Result<&'v Value, JsonError> {
    obj.get(key).ok_or_else(|| JsonError::Missing {
        at: at.to_owned(),
        key,
    })
}

/// A key's value, with `null` taken as absent (newer Nix writes `null` for
/// what it does not know).
fn present<'v>(obj: &'v serde_json::Map<String, Value>, key: &str) -> Option<&'v Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn parse_path(store: &StoreDir, value: &Value, at: &str) -> Result<StorePath, JsonError> {
    parse_path_text(store, as_str(value, at)?, at)
}

/// A store path, written in full (`/nix/store/…`, up to format version 2) or
/// as its base name (version 3 on).
fn parse_path_text(store: &StoreDir, text: &str, at: &str) -> Result<StorePath, JsonError> {
    let parsed = if text.starts_with('/') {
        store.parse_path(text)
    } else {
        StorePath::from_base_name(text)
    };
    parsed.map_err(|source| JsonError::BadStorePath {
        at: at.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aterm;

    fn store() -> StoreDir {
        StoreDir::default()
    }

    const FIXED_DRV: &str = r#"Derive([("out","/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo","r:sha256","0000000000000000000000000000000000000000000000000000000000000000")],[],[],"x86_64-linux","/bin/sh",[],[("builder","/bin/sh"),("name","fo"),("out","/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"),("outputHash","0000000000000000000000000000000000000000000000000000"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    /// What `nix show-derivation` (Nix 2.8) printed for FIXED_DRV.
    const FIXED_JSON: &str = r#"{
  "/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv": {
    "outputs": {
      "out": {
        "path": "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo",
        "hashAlgo": "r:sha256",
        "hash": "0000000000000000000000000000000000000000000000000000000000000000"
      }
    },
    "inputSrcs": [],
    "inputDrvs": {},
    "system": "x86_64-linux",
    "builder": "/bin/sh",
    "args": [],
    "env": {
      "builder": "/bin/sh",
      "name": "fo",
      "out": "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo",
      "outputHash": "0000000000000000000000000000000000000000000000000000",
      "outputHashAlgo": "sha256",
      "outputHashMode": "recursive",
      "system": "x86_64-linux"
    }
  }
}"#;

    fn fixed() -> (StorePath, Derivation) {
        (
            store()
                .parse_path("/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv")
                .unwrap(),
            aterm::parse(&store(), FIXED_DRV.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn prints_what_nix_prints() {
        let (path, drv) = fixed();
        let json = print(&store(), [(&path, &drv)]);
        assert_eq!(String::from_utf8(json).unwrap(), FIXED_JSON);
    }

    #[test]
    fn reads_what_nix_prints() {
        let (path, drv) = fixed();
        let parsed = parse(&store(), FIXED_JSON).unwrap();
        assert_eq!(
            parsed,
            vec![JsonDerivation {
                drv_path: Some(path),
                name: Some("fo".into()),
                derivation: drv
            }]
        );
    }

    #[test]
    fn escapes_control_characters_as_nix() {
        let drv = Derivation {
            env: [(
                "x".into(),
                BString::from(&b"\x01\x1f\x7f\x08\x0c \xc3\xa9\"\\\n\r\t"[..]),
            )]
            .into(),
            ..Derivation::default()
        };
        let json = print_one(&store(), &drv);
        let text = String::from_utf8(json).unwrap();
        assert!(
            text.contains("\"x\": \"\\u0001\\u001f\x7f\\u0008\\u000c é\\\"\\\\\\n\\r\\t\""),
            "{text}"
        );
    }

    #[test]
    fn reads_newer_shapes_and_computes_missing_fixed_paths() {
        let newer = r#"{
          "name": "fo",
          "outputs": { "out": { "method": "nar", "hashAlgo": "sha256",
                                "hash": "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" } },
          "inputDrvs": { "/nix/store/a1vz6ql80xsx2k3bfnks0pc2v39flqx4-dep.drv":
                           { "outputs": ["out"], "dynamicOutputs": {} } },
          "system": "x86_64-linux", "builder": "/bin/sh"
        }"#;
        let parsed = parse(&store(), newer).unwrap().remove(0);
        assert_eq!(parsed.drv_path, None);
        assert_eq!(parsed.name.as_deref(), Some("fo"));
        let (_, fixed) = fixed();
        assert_eq!(parsed.derivation.outputs, fixed.outputs);
        assert_eq!(parsed.derivation.input_derivations.len(), 1);
        assert!(parsed.derivation.env.is_empty() && parsed.derivation.args.is_empty());
    }

    #[test]
    fn reads_format_versions_3_and_4() {
        let v4 = r#"{
          "dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv": {
            "version": 4,
            "name": "fo",
            "outputs": { "out": { "path": null, "method": "nar", "hashAlgo": "sha256",
                                  "hash": "0000000000000000000000000000000000000000000000000000000000000000" } },
            "inputs": { "srcs": ["bx0kc66p03368r5plk2sji4a39h20ymp-t.txt"],
                        "drvs": { "a1vz6ql80xsx2k3bfnks0pc2v39flqx4-dep.drv":
                                    { "outputs": ["dev", "out"], "dynamicOutputs": {} } } },
            "system": "x86_64-linux", "builder": "/bin/sh", "args": [], "env": {},
            "structuredAttrs": { "b": [1, true], "a": "x" }
          }
        }"#;
        let parsed = parse(&store(), v4).unwrap().remove(0);
        assert_eq!(parsed.drv_path, Some(fixed().0));
        let drv = parsed.derivation;
        assert_eq!(drv.outputs, fixed().1.outputs);
        assert_eq!(
            drv.input_sources.first().unwrap().base_name(),
            "bx0kc66p03368r5plk2sji4a39h20ymp-t.txt"
        );
        assert_eq!(drv.input_derivations.values().next().unwrap().len(), 2);
        assert_eq!(drv.env_str("__json"), Some(r#"{"a":"x","b":[1,true]}"#));
    }

    #[test]
    fn errors_say_where() {
        let bad = FIXED_JSON.replace("\"r:sha256\"", "\"r:sha257\"");
        let err = parse(&store(), &bad).unwrap_err().to_string();
        assert!(err.contains("-fo.drv.outputs.out.hashAlgo"), "{err}");
        let bad = FIXED_JSON.replace("\"args\": []", "\"args\": [1]");
        let err = parse(&store(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("args[0]: expected a string, found the number 1"),
            "{err}"
        );
        let bad = FIXED_JSON.replace("\"system\": \"x86_64-linux\",\n    ", "");
        let err = parse(&store(), &bad).unwrap_err().to_string();
        assert!(err.contains("missing key 'system'"), "{err}");
    }
}
