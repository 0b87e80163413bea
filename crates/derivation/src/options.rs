//! Build options a derivation sets through its attributes, read with Nix's
//! rules: from the environment (booleans are `"1"`/`""`, lists are
//! whitespace-separated) or, with `__structuredAttrs = true`, from the JSON in
//! `env.__json` (real booleans, lists and objects, and per-output
//! `outputChecks`).

use std::collections::{BTreeMap, BTreeSet};

use bstr::ByteSlice;
use serde_json::{Map, Value};

use crate::derivation::{Derivation, DerivationOutput};

/// Why a derivation's build options could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BuildOptionsError {
    #[error("the structured attributes (__json) are not valid JSON: {0}")]
    BadJson(serde_json::Error),
    #[error("the structured attributes (__json) are not a JSON object")]
    JsonNotObject,
    #[error("attribute '{attr}' must be {expected}")]
    WrongType {
        attr: String,
        expected: &'static str,
    },
    #[error("attribute '{0}' is not valid UTF-8")]
    NotUtf8(String),
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    OddExportReferencesGraph(String),
    #[error(
        "invalid file name '{0}' in 'exportReferencesGraph' (expected letters, digits, '_', '.', '-', not starting with a digit, '.' or '-')"
    )]
    BadExportFileName(String),
}

type Result<T> = std::result::Result<T, BuildOptionsError>;

/// The checks made on an output after the build.
///
/// Entries of the reference lists are store paths or output names of the
/// same derivation, resolved when the build is done.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutputChecks {
    pub allowed_references: Option<Vec<String>>,
    pub allowed_requisites: Option<Vec<String>>,
    pub disallowed_references: Option<Vec<String>>,
    pub disallowed_requisites: Option<Vec<String>>,
    /// Largest allowed NAR size of the output.
    pub max_size: Option<u64>,
    /// Largest allowed NAR size of the output's closure.
    pub max_closure_size: Option<u64>,
    /// Structured attributes' checks ignore the output's references to itself.
    pub ignore_self_refs: bool,
}

/// Which outputs the checks apply to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChecksSpec {
    /// Without structured attributes: the top-level attributes
    /// (`allowedReferences`, …) apply to every output.
    AllOutputs(OutputChecks),
    /// With structured attributes: `outputChecks.<output>`; the top-level
    /// attributes are ignored, as in Nix.
    PerOutput(BTreeMap<String, OutputChecks>),
}

impl OutputChecksSpec {
    /// The checks for output `name`, if any.
    pub fn for_output(&self, name: &str) -> Option<&OutputChecks> {
        match self {
            OutputChecksSpec::AllOutputs(checks) => Some(checks),
            OutputChecksSpec::PerOutput(map) => map.get(name),
        }
    }
}

/// The options a derivation sets for its build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// The structured attributes, when the derivation has `__json`.
    pub structured_attrs: Option<Map<String, Value>>,
    /// Features the build machine must have (`kvm`, `big-parallel`, …);
    /// `ca-derivations` is added for floating content-addressed outputs.
    pub required_system_features: BTreeSet<String>,
    pub prefer_local_build: bool,
    /// `allowSubstitutes`, true unless set otherwise.
    pub allow_substitutes: bool,
    pub output_checks: OutputChecksSpec,
    /// File name in the build directory → store paths whose closure's
    /// references graph is written there.
    pub export_references_graph: BTreeMap<String, Vec<String>>,
    /// Variables whose value is passed in a file (`$<name>Path`) instead;
    /// empty with structured attributes.
    pub pass_as_file: BTreeSet<String>,
    /// Variables taken from the calling environment (fixed-output builds).
    pub impure_env_vars: Vec<String>,
    /// `__noChroot`: build outside the sandbox.
    pub no_chroot: bool,
    pub output_hash: Option<String>,
    pub output_hash_algo: Option<String>,
    pub output_hash_mode: Option<String>,
}

/// Where attributes are read from.
enum Source<'a> {
    Env(&'a Derivation),
    Json(&'a Map<String, Value>),
}

impl Source<'_> {
    fn env_str(drv: &Derivation, name: &str) -> Result<Option<String>> {
        match drv.env.get(name.as_bytes().as_bstr()) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.to_owned()))
                .map_err(|_| BuildOptionsError::NotUtf8(name.to_owned())),
        }
    }

    fn string(&self, name: &str) -> Result<Option<String>> {
        match self {
            Source::Env(drv) => Self::env_str(drv, name),
            Source::Json(map) => match map.get(name) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(wrong(name, "a string")),
            },
        }
    }

    fn bool(&self, name: &str, default: bool) -> Result<bool> {
        match self {
            Source::Env(drv) => Ok(match drv.env.get(name.as_bytes().as_bstr()) {
                None => default,
                Some(v) => v == "1",
            }),
            Source::Json(map) => match map.get(name) {
                None => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => Err(wrong(name, "a Boolean")),
            },
        }
    }

    fn strings(&self, name: &str) -> Result<Option<Vec<String>>> {
        match self {
            Source::Env(drv) => Ok(Self::env_str(drv, name)?.map(|s| tokenize(&s))),
            Source::Json(map) => map.get(name).map(|v| string_list(v, name)).transpose(),
        }
    }
}

/// Splits on the whitespace Nix splits lists on.
fn tokenize(s: &str) -> Vec<String> {
    s.split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn wrong(attr: &str, expected: &'static str) -> BuildOptionsError {
    BuildOptionsError::WrongType {
        attr: attr.to_owned(),
        expected,
    }
}

fn string_list(value: &Value, attr: &str) -> Result<Vec<String>> {
    let items = value
        .as_array()
        .ok_or_else(|| wrong(attr, "a list of strings"))?;
    items
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| wrong(attr, "a list of strings"))
        })
        .collect()
}

fn valid_export_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl BuildOptions {
    /// Reads the options of `drv`.
    pub fn from_derivation(drv: &Derivation) -> Result<BuildOptions> {
        let structured_attrs = match Source::env_str(drv, "__json")? {
            None => None,
            Some(text) => match serde_json::from_str(&text).map_err(BuildOptionsError::BadJson)? {
                Value::Object(map) => Some(map),
                _ => return Err(BuildOptionsError::JsonNotObject),
            },
        };
        let source = match &structured_attrs {
            Some(map) => Source::Json(map),
            None => Source::Env(drv),
        };

        let mut required_system_features: BTreeSet<String> = source
            .strings("requiredSystemFeatures")?
            .unwrap_or_default()
            .into_iter()
            .collect();
        if drv
            .outputs
            .values()
            .any(|o| matches!(o, DerivationOutput::Floating { .. }))
        {
            required_system_features.insert("ca-derivations".to_owned());
        }

        let output_checks = match &structured_attrs {
            None => OutputChecksSpec::AllOutputs(OutputChecks {
                allowed_references: source.strings("allowedReferences")?,
                allowed_requisites: source.strings("allowedRequisites")?,
                disallowed_references: source.strings("disallowedReferences")?,
                disallowed_requisites: source.strings("disallowedRequisites")?,
                max_size: None,
                max_closure_size: None,
                ignore_self_refs: false,
            }),
            Some(map) => OutputChecksSpec::PerOutput(per_output_checks(map)?),
        };

        let export_references_graph = match &source {
            Source::Env(_) => {
                let text = source.string("exportReferencesGraph")?.unwrap_or_default();
                let tokens = tokenize(&text);
                if tokens.len() % 2 != 0 {
                    return Err(BuildOptionsError::OddExportReferencesGraph(text));
                }
                let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
                for pair in tokens.chunks(2) {
                    map.entry(pair[0].clone())
                        .or_default()
                        .push(pair[1].clone());
                }
                map
            }
            Source::Json(json) => match json.get("exportReferencesGraph") {
                None => BTreeMap::new(),
                Some(Value::Object(entries)) => entries
                    .iter()
                    .map(|(name, paths)| {
                        let attr = format!("exportReferencesGraph.{name}");
                        let paths = match paths {
                            Value::String(s) => vec![s.clone()],
                            other => string_list(other, &attr)?,
                        };
                        Ok((name.clone(), paths))
                    })
                    .collect::<Result<_>>()?,
                Some(_) => return Err(wrong("exportReferencesGraph", "an object")),
            },
        };
        if let Some(bad) = export_references_graph
            .keys()
            .find(|name| !valid_export_name(name))
        {
            return Err(BuildOptionsError::BadExportFileName(bad.clone()));
        }

        let pass_as_file = match &source {
            Source::Env(_) => source
                .strings("passAsFile")?
                .unwrap_or_default()
                .into_iter()
                .collect(),
            Source::Json(_) => BTreeSet::new(),
        };

        Ok(BuildOptions {
            required_system_features,
            prefer_local_build: source.bool("preferLocalBuild", false)?,
            allow_substitutes: source.bool("allowSubstitutes", true)?,
            output_checks,
            export_references_graph,
            pass_as_file,
            impure_env_vars: source.strings("impureEnvVars")?.unwrap_or_default(),
            no_chroot: source.bool("__noChroot", false)?,
            output_hash: source.string("outputHash")?,
            output_hash_algo: source.string("outputHashAlgo")?,
            output_hash_mode: source.string("outputHashMode")?,
            structured_attrs,
        })
    }

    /// True when the derivation uses structured attributes.
    pub fn has_structured_attrs(&self) -> bool {
        self.structured_attrs.is_some()
    }
}

fn per_output_checks(map: &Map<String, Value>) -> Result<BTreeMap<String, OutputChecks>> {
    let Some(all) = map.get("outputChecks") else {
        return Ok(BTreeMap::new());
    };
    let all = all
        .as_object()
        .ok_or_else(|| wrong("outputChecks", "an object"))?;
    all.iter()
        .map(|(output, checks)| {
            let attr = |key: &str| format!("outputChecks.{output}.{key}");
            let checks = checks
                .as_object()
                .ok_or_else(|| wrong(&format!("outputChecks.{output}"), "an object"))?;
            let list = |key: &str| -> Result<Option<Vec<String>>> {
                checks
                    .get(key)
                    .map(|v| string_list(v, &attr(key)))
                    .transpose()
            };
            let size = |key: &str| -> Result<Option<u64>> {
                checks
                    .get(key)
                    .map(|v| {
                        v.as_u64()
                            .ok_or_else(|| wrong(&attr(key), "a non-negative integer"))
                    })
                    .transpose()
            };
            Ok((
                output.clone(),
                OutputChecks {
                    allowed_references: list("allowedReferences")?,
                    allowed_requisites: list("allowedRequisites")?,
                    disallowed_references: list("disallowedReferences")?,
                    disallowed_requisites: list("disallowedRequisites")?,
                    max_size: size("maxSize")?,
                    max_closure_size: size("maxClosureSize")?,
                    ignore_self_refs: true,
                },
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drv(env: &[(&str, &str)]) -> Derivation {
        Derivation {
            env: env
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Derivation::default()
        }
    }

    #[test]
    fn defaults() {
        let opts = BuildOptions::from_derivation(&drv(&[])).unwrap();
        assert!(opts.allow_substitutes && !opts.prefer_local_build && !opts.no_chroot);
        assert!(opts.required_system_features.is_empty());
        assert_eq!(
            opts.output_checks.for_output("out"),
            Some(&OutputChecks::default())
        );
        assert!(!opts.has_structured_attrs());
    }

    #[test]
    fn from_the_environment() {
        let opts = BuildOptions::from_derivation(&drv(&[
            ("requiredSystemFeatures", " kvm\tbig-parallel\n"),
            ("preferLocalBuild", "1"),
            ("allowSubstitutes", ""),
            ("__noChroot", "true"), // only "1" is true
            ("allowedReferences", "out /nix/store/x"),
            ("disallowedRequisites", ""),
            (
                "exportReferencesGraph",
                "graph /nix/store/a closure-b /nix/store/b",
            ),
            ("passAsFile", "text other"),
            ("impureEnvVars", "http_proxy https_proxy"),
            ("outputHash", "abc"),
            ("outputHashMode", "recursive"),
        ]))
        .unwrap();
        assert_eq!(
            opts.required_system_features,
            ["big-parallel".to_owned(), "kvm".to_owned()].into()
        );
        assert!(opts.prefer_local_build && !opts.allow_substitutes && !opts.no_chroot);
        let checks = opts.output_checks.for_output("dev").unwrap();
        assert_eq!(
            checks.allowed_references,
            Some(vec!["out".to_owned(), "/nix/store/x".to_owned()])
        );
        assert_eq!(checks.disallowed_requisites, Some(vec![]));
        assert_eq!(checks.allowed_requisites, None);
        assert_eq!(opts.export_references_graph["closure-b"], ["/nix/store/b"]);
        assert_eq!(opts.pass_as_file.len(), 2);
        assert_eq!(opts.impure_env_vars, ["http_proxy", "https_proxy"]);
        assert_eq!(opts.output_hash.as_deref(), Some("abc"));
        assert_eq!(opts.output_hash_algo, None);
    }

    #[test]
    fn from_structured_attrs() {
        let json = r#"{"requiredSystemFeatures":["kvm"],"preferLocalBuild":true,
            "allowSubstitutes":false,"__noChroot":true,"allowedReferences":["ignored"],
            "outputChecks":{"out":{"allowedReferences":[],"maxSize":1000},
                            "dev":{"disallowedRequisites":["/nix/store/x"]}},
            "exportReferencesGraph":{"g":["/nix/store/a"],"h":"/nix/store/b"},
            "passAsFile":["ignored"],"outputHash":"abc"}"#;
        let opts = BuildOptions::from_derivation(&drv(&[("__json", json)])).unwrap();
        assert!(opts.has_structured_attrs());
        assert!(opts.prefer_local_build && !opts.allow_substitutes && opts.no_chroot);
        let out = opts.output_checks.for_output("out").unwrap();
        assert_eq!(out.allowed_references, Some(vec![]));
        assert_eq!(out.max_size, Some(1000));
        assert!(out.ignore_self_refs);
        assert_eq!(
            opts.output_checks
                .for_output("dev")
                .unwrap()
                .disallowed_requisites,
            Some(vec!["/nix/store/x".to_owned()])
        );
        assert_eq!(opts.output_checks.for_output("lib"), None);
        assert_eq!(opts.export_references_graph["h"], ["/nix/store/b"]);
        assert!(opts.pass_as_file.is_empty());
        assert_eq!(opts.output_hash.as_deref(), Some("abc"));
    }

    #[test]
    fn errors_name_the_attribute() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("__json", "{\"preferLocalBuild\":\"1\"}")],
                "'preferLocalBuild' must be a Boolean",
            ),
            (
                &[("__json", "{\"impureEnvVars\":[1]}")],
                "'impureEnvVars' must be a list of strings",
            ),
            (&[("__json", "[]")], "not a JSON object"),
            (&[("__json", "{")], "not valid JSON"),
            (
                &[("exportReferencesGraph", "a /nix/store/x b")],
                "odd number",
            ),
            (
                &[("exportReferencesGraph", "../a /nix/store/x")],
                "invalid file name '../a'",
            ),
            (
                &[("__json", "{\"outputChecks\":{\"out\":{\"maxSize\":-1}}}")],
                "'outputChecks.out.maxSize' must be a non-negative integer",
            ),
        ];
        for (env, message) in cases {
            let err = BuildOptions::from_derivation(&drv(env)).unwrap_err();
            assert!(err.to_string().contains(message), "{err} / {message}");
        }
    }
}
