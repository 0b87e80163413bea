//! What a builder sees besides its inputs: Nix's environment (the fixed
//! variables, the derivation's own, output placeholders replaced), and the
//! files Nix writes into the build directory — `passAsFile` values,
//! `exportReferencesGraph` closures, and with structured attributes
//! `.attrs.json` and `.attrs.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use bstr::{BString, ByteSlice};
use kiln_derivation::{BuildOptions, Derivation};
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::nixbase32;
use kiln_formats::store_path::{StoreDir, StorePath, StorePathSet};
use kiln_store::{Store, StoreError, compute_closure};
use serde_json::{Map, Value};

/// Where the build directory is inside the sandbox.
pub const BUILD_TOP: &str = "/build";

/// Why the environment could not be made.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("'exportReferencesGraph' names '{0}', which is not a store path in the build's inputs")]
    ExportNotInput(String),
    #[error("cannot compute the closure for 'exportReferencesGraph': {0}")]
    Store(#[from] StoreError),
}

/// Nix's `hashPlaceholder`: the string an output's path stands in for
/// where it is not known when the derivation is written.
pub fn hash_placeholder(output: &str) -> String {
    let hash = Hash::digest(HashAlgo::Sha256, format!("nix-output:{output}"));
    format!("/{}", nixbase32::encode(hash.as_bytes()))
}

/// The environment and the files to write into the build directory
/// (name relative to it → contents).
#[derive(Debug, Default)]
pub struct Prepared {
    pub env: BTreeMap<BString, BString>,
    pub args: Vec<BString>,
    pub builder: BString,
    pub files: Vec<(String, Vec<u8>)>,
}

/// What is needed to prepare a build.
#[derive(Debug)]
pub struct EnvInputs<'a> {
    pub store: &'a dyn Store,
    pub drv: &'a Derivation,
    pub options: &'a BuildOptions,
    /// Output name → path.
    pub outputs: &'a BTreeMap<String, StorePath>,
    /// The closure of the inputs.
    pub input_paths: &'a StorePathSet,
    pub cores: usize,
    /// The build top as the builder sees it (`/build`, or the host path
    /// when unsandboxed).
    pub build_top: &'a str,
    pub home: &'a str,
}

fn rewrite(value: &[u8], rewrites: &[(String, String)]) -> BString {
    let mut out = BString::from(value);
    for (from, to) in rewrites {
        if out.find(from.as_bytes()).is_some() {
            out = BString::from(out.replace(from.as_bytes(), to.as_bytes()));
        }
    }
    out
}

/// Makes the environment, arguments and files of a build as Nix 2.8 does.
pub fn prepare(inputs: &EnvInputs<'_>) -> Result<Prepared, EnvError> {
    let store_dir = inputs.store.store_dir();
    let rewrites: Vec<(String, String)> = inputs
        .outputs
        .iter()
        .map(|(name, path)| (hash_placeholder(name), store_dir.print_path(path)))
        .collect();
    let mut p = Prepared {
        builder: rewrite(&inputs.drv.builder, &rewrites),
        args: inputs
            .drv
            .args
            .iter()
            .map(|a| rewrite(a, &rewrites))
            .collect(),
        ..Prepared::default()
    };
    let mut set = |k: &str, v: &str| {
        p.env.insert(k.into(), v.into());
    };
    set("PATH", "/path-not-set");
    set("HOME", inputs.home);
    set("NIX_STORE", store_dir.as_str());
    set("NIX_BUILD_CORES", &inputs.cores.to_string());

    if inputs.options.structured_attrs.is_none() {
        for (key, value) in &inputs.drv.env {
            let value = rewrite(value, &rewrites);
            let key_str = key.to_str_lossy();
            if inputs.options.pass_as_file.contains(key_str.as_ref()) {
                let hash = Hash::digest(HashAlgo::Sha256, key.as_slice());
                let file = format!(".attr-{}", nixbase32::encode(hash.as_bytes()));
                p.env.insert(
                    BString::from(format!("{key_str}Path")),
                    BString::from(format!("{}/{file}", inputs.build_top)),
                );
                p.files.push((file, value.into()));
            } else {
                p.env.insert(key.clone(), value);
            }
        }
    }

    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        p.env.insert(k.into(), inputs.build_top.into());
    }
    if inputs.drv.is_fixed_output() {
        p.env.insert("NIX_OUTPUT_CHECKED".into(), "1".into());
        for var in &inputs.options.impure_env_vars {
            if let Ok(value) = std::env::var(var) {
                p.env.insert(var.as_str().into(), value.into());
            }
        }
    }
    p.env.insert("NIX_LOG_FD".into(), "2".into());
    p.env.insert("TERM".into(), "xterm-256color".into());

    // exportReferencesGraph: a file per name, in the validity-registration
    // text form, or JSON path infos with structured attributes.
    let mut graphs = BTreeMap::new();
    for (name, paths) in &inputs.options.export_references_graph {
        let mut start = StorePathSet::new();
        for p in paths {
            let path = store_dir
                .parse_path(p)
                .map_err(|_| EnvError::ExportNotInput(p.clone()))?;
            if !inputs.input_paths.contains(&path) {
                return Err(EnvError::ExportNotInput(p.clone()));
            }
            start.insert(path);
        }
        let mut closure = compute_closure(inputs.store, &start, false, false, false)?;
        // Derivations bring their outputs' closures, as in Nix.
        let drvs: Vec<StorePath> = closure
            .iter()
            .filter(|p| p.is_derivation())
            .cloned()
            .collect();
        for d in drvs {
            let outs: StorePathSet = inputs
                .store
                .query_derivation_outputs(&d)?
                .into_values()
                .filter(|o| inputs.store.is_valid_path(o).unwrap_or(false))
                .collect();
            closure.extend(compute_closure(inputs.store, &outs, false, false, false)?);
        }
        graphs.insert(name.clone(), closure);
    }

    match &inputs.options.structured_attrs {
        None => {
            for (name, closure) in &graphs {
                let mut text = String::new();
                for path in closure {
                    let info = inputs.store.path_info_or_error(path)?;
                    let _ = writeln!(text, "{}", store_dir.display(path));
                    text.push('\n');
                    let _ = writeln!(text, "{}", info.references.len());
                    for r in &info.references {
                        let _ = writeln!(text, "{}", store_dir.display(r));
                    }
                }
                p.files.push((name.clone(), text.into_bytes()));
            }
        }
        Some(attrs) => {
            let mut json = attrs.clone();
            let outputs: Map<String, Value> = inputs
                .outputs
                .iter()
                .map(|(n, path)| (n.clone(), Value::String(store_dir.print_path(path))))
                .collect();
            json.insert("outputs".into(), Value::Object(outputs));
            for (name, closure) in &graphs {
                json.insert(name.clone(), path_infos_json(inputs.store, closure)?);
            }
            let json = rewrite_json(Value::Object(json), &rewrites);
            let Value::Object(json) = json else {
                unreachable!("an object stays an object")
            };
            p.files.push((
                ".attrs.json".into(),
                Value::Object(json.clone()).to_string().into_bytes(),
            ));
            p.files
                .push((".attrs.sh".into(), attrs_sh(&json).into_bytes()));
        }
    }
    Ok(p)
}

fn rewrite_json(value: Value, rewrites: &[(String, String)]) -> Value {
    match value {
        Value::String(s) => {
            let mut s = s;
            for (from, to) in rewrites {
                if s.contains(from.as_str()) {
                    s = s.replace(from.as_str(), to);
                }
            }
            Value::String(s)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|v| rewrite_json(v, rewrites)).collect()),
        Value::Object(o) => Value::Object(
            o.into_iter()
                .map(|(k, v)| (k, rewrite_json(v, rewrites)))
                .collect(),
        ),
        other => other,
    }
}

/// Path infos as `exportReferencesGraph` gives them with structured
/// attributes: Nix 2.8's `pathInfoToJSON` without impure fields, with the
/// closure size.
fn path_infos_json(store: &dyn Store, closure: &StorePathSet) -> Result<Value, StoreError> {
    let store_dir = store.store_dir();
    let mut out = Vec::new();
    for path in closure {
        let info = store.path_info_or_error(path)?;
        let own_closure = compute_closure(store, &[path.clone()].into(), false, false, false)?;
        let mut closure_size = 0u64;
        for p in &own_closure {
            closure_size += store.path_info_or_error(p)?.nar_size;
        }
        let mut o = Map::new();
        o.insert("path".into(), store_dir.print_path(path).into());
        o.insert(
            "narHash".into(),
            info.nar_hash
                .to_typed_string(kiln_formats::hash::HashFormat::Nixbase32)
                .into(),
        );
        o.insert("narSize".into(), info.nar_size.into());
        o.insert(
            "references".into(),
            Value::Array(
                info.references
                    .iter()
                    .map(|r| Value::String(store_dir.print_path(r)))
                    .collect(),
            ),
        );
        o.insert("closureSize".into(), closure_size.into());
        out.push(Value::Object(o));
    }
    Ok(Value::Array(out))
}

fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn simple(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(shell_escape(s)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Some(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Some(u.to_string())
            } else {
                n.as_f64().map(|f| format!("{f}"))
            }
        }
        Value::Bool(b) => Some(if *b { "1".into() } else { String::new() }),
        Value::Null => Some("''".into()),
        _ => None,
    }
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `.attrs.sh`: the structured attributes a shell can hold, as `declare`
/// lines (strings, numbers, Booleans; lists and objects of those).
pub fn attrs_sh(json: &Map<String, Value>) -> String {
    let mut out = String::new();
    for (key, value) in json {
        if !is_shell_name(key) {
            continue;
        }
        if let Some(s) = simple(value) {
            let _ = writeln!(out, "declare {key}={s}");
        } else if let Value::Array(items) = value {
            let parts: Option<Vec<String>> = items.iter().map(simple).collect();
            if let Some(parts) = parts {
                let mut s = String::from("(");
                for p in parts {
                    s.push_str(&p);
                    s.push(' ');
                }
                let _ = writeln!(out, "declare -a {key}={s})");
            }
        } else if let Value::Object(items) = value {
            let parts: Option<Vec<(String, String)>> = items
                .iter()
                .map(|(k, v)| simple(v).map(|s| (k.clone(), s)))
                .collect();
            if let Some(parts) = parts {
                let mut s = String::from("(");
                for (k, v) in parts {
                    let _ = write!(s, "[{}]={v} ", shell_escape(&k));
                }
                let _ = writeln!(out, "declare -A {key}={s})");
            }
        }
    }
    out
}

/// The set of output names a derivation's options refer to (for checks).
pub fn output_names(drv: &Derivation) -> BTreeSet<String> {
    drv.outputs.keys().cloned().collect()
}

/// The store directory's printed form of each path, for messages.
pub fn print_paths(store_dir: &StoreDir, paths: &StorePathSet) -> String {
    paths
        .iter()
        .map(|p| format!("\n  {}", store_dir.display(p)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_matches_nix() {
        // `builtins.placeholder "out"` in Nix 2.8.
        assert_eq!(
            hash_placeholder("out"),
            "/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"
        );
    }

    #[test]
    fn attrs_sh_declares() {
        let json: Map<String, Value> = serde_json::from_str(
            r#"{"s":"it's","n":3,"b":true,"f":false,"l":["a","b"],"o":{"k":"v"},"bad-name":1,"nested":[[1]]}"#,
        )
        .unwrap();
        let sh = attrs_sh(&json);
        assert!(sh.contains("declare s='it'\\''s'\n"), "{sh}");
        assert!(sh.contains("declare n=3\n"));
        assert!(sh.contains("declare b=1\n"));
        assert!(sh.contains("declare f=\n"));
        assert!(sh.contains("declare -a l=('a' 'b' )\n"));
        assert!(sh.contains("declare -A o=(['k']='v' )\n"));
        assert!(!sh.contains("bad-name") && !sh.contains("nested"));
    }
}
