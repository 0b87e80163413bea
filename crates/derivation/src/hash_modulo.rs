//! Hashing a derivation modulo its fixed-output inputs, and the store paths
//! that follow from it: output paths and the `.drv` file's own path.
//!
//! Nix names an input-addressed output after a hash of its derivation in
//! which every input derivation is replaced by *its* hash modulo, so that a
//! fixed-output input (a download) can change how it is fetched without
//! changing anything downstream. A fixed-output derivation's hash modulo is
//! `sha256("fixed:out:<method><algo>:<base16 hash>:<output path>")`.
//!
//! The functions here take the lookup of input derivation hashes as a
//! closure; [`DrvFileHashes`] is one that reads `.drv` files from a directory
//! and remembers what it computed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::path::{Path, PathBuf};

use bstr::BString;
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::store_path::{StoreDir, StorePath, StorePathError};

use crate::aterm::{self, AtermError, Mode};
use crate::derivation::{Derivation, DerivationOutput, drv_name};

/// Why a hash modulo or an output path could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum HashModuloError<E> {
    #[error("cannot get the hash of input derivation '{drv_path}'")]
    Lookup {
        drv_path: String,
        #[source]
        source: E,
    },
    #[error(
        "output '{output}' of derivation '{name}' is a floating content-addressed output; \
         Kiln does not support content-addressed derivations (__contentAddressed) yet"
    )]
    FloatingNotSupported { name: String, output: String },
    #[error(
        "output '{output}' of derivation '{name}' is impure; Kiln does not support impure derivations yet"
    )]
    ImpureNotSupported { name: String, output: String },
    #[error(
        "fixed-output derivation '{name}' must have exactly one output, named 'out' (it has: {outputs})"
    )]
    BadFixedOutputs { name: String, outputs: String },
    #[error("cannot compute the path of output '{output}' of derivation '{name}': {source}")]
    OutputPath {
        name: String,
        output: String,
        source: StorePathError,
    },
}

type Result<T, E> = std::result::Result<T, HashModuloError<E>>;

/// Checks that every output is one whose path Kiln can compute, and that a
/// fixed-output derivation has the single output `out`.
fn check_supported<E>(drv: &Derivation, name: &str) -> Result<(), E> {
    let fixed = drv
        .outputs
        .values()
        .filter(|o| matches!(o, DerivationOutput::Fixed { .. }))
        .count();
    if fixed > 0 && (drv.outputs.len() != 1 || !drv.outputs.contains_key("out")) {
        return Err(HashModuloError::BadFixedOutputs {
            name: name.to_owned(),
            outputs: drv
                .outputs
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    for (output, o) in &drv.outputs {
        match o {
            DerivationOutput::Floating { .. } => {
                return Err(HashModuloError::FloatingNotSupported {
                    name: name.to_owned(),
                    output: output.clone(),
                });
            }
            DerivationOutput::Impure { .. } => {
                return Err(HashModuloError::ImpureNotSupported {
                    name: name.to_owned(),
                    output: output.clone(),
                });
            }
            _ => {}
        }
    }
    Ok(())
}

/// Nix's `hashDerivationModulo`: the hash that stands for `drv` (named
/// `name`, without `.drv`) when it is an input of another derivation
/// (`mask_outputs = false`), or from which its own input-addressed output
/// paths follow (`mask_outputs = true`).
///
/// `input_hash` gives the (unmasked) hash modulo of an input derivation.
pub fn hash_modulo<E>(
    store: &StoreDir,
    drv: &Derivation,
    name: &str,
    mask_outputs: bool,
    mut input_hash: impl FnMut(&StorePath) -> std::result::Result<Hash, E>,
) -> Result<Hash, E> {
    check_supported(drv, name)?;
    if let Some(DerivationOutput::Fixed { hash, .. }) = drv.outputs.get("out") {
        // The path is recomputed rather than read, as Nix does, so that a
        // wrong path in a file cannot leak into the hashes downstream.
        let path =
            hash.store_path(store, name, "out")
                .map_err(|source| HashModuloError::OutputPath {
                    name: name.to_owned(),
                    output: "out".to_owned(),
                    source,
                })?;
        let fingerprint = format!(
            "fixed:out:{}:{}:{}",
            hash.method_algo(),
            hash.hash.to_base16(),
            store.display(&path)
        );
        return Ok(Hash::digest(HashAlgo::Sha256, fingerprint));
    }
    // Two inputs with the same hash modulo (say, two fetches of the same
    // file) collapse into one entry, as in Nix.
    let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (drv_path, outputs) in &drv.input_derivations {
        let hash = input_hash(drv_path).map_err(|source| HashModuloError::Lookup {
            drv_path: store.print_path(drv_path),
            source,
        })?;
        inputs
            .entry(hash.to_base16())
            .or_default()
            .extend(outputs.iter().cloned());
    }
    let mut text = Vec::with_capacity(4096);
    aterm::write(
        store,
        drv,
        &mut text,
        Mode::Hashing {
            mask_outputs,
            inputs: &inputs,
        },
    );
    Ok(Hash::digest(HashAlgo::Sha256, &text))
}

/// The store path of every output of `drv` (named `name`), computed from its
/// content rather than read from it.
pub fn output_paths<E>(
    store: &StoreDir,
    drv: &Derivation,
    name: &str,
    input_hash: impl FnMut(&StorePath) -> std::result::Result<Hash, E>,
) -> Result<BTreeMap<String, StorePath>, E> {
    check_supported(drv, name)?;
    let path_error = |output: &str, source| HashModuloError::OutputPath {
        name: name.to_owned(),
        output: output.to_owned(),
        source,
    };
    if drv.is_fixed_output() {
        let mut paths = BTreeMap::new();
        for (output, o) in &drv.outputs {
            if let DerivationOutput::Fixed { hash, .. } = o {
                let path = hash
                    .store_path(store, name, output)
                    .map_err(|e| path_error(output, e))?;
                paths.insert(output.clone(), path);
            }
        }
        return Ok(paths);
    }
    let hash = hash_modulo(store, drv, name, true, input_hash)?;
    drv.outputs
        .keys()
        .map(|output| {
            let path = store
                .make_output_path(output, &hash, name)
                .map_err(|e| path_error(output, e))?;
            Ok((output.clone(), path))
        })
        .collect()
}

/// Fills in the output paths of a derivation whose outputs are not computed
/// yet (empty paths), and the environment variables named after its
/// outputs, as `nix-instantiate` and `nix derivation add` do. Existing paths
/// are recomputed, so this also repairs a derivation with wrong ones.
pub fn fill_in_output_paths<E>(
    store: &StoreDir,
    drv: &mut Derivation,
    name: &str,
    input_hash: impl FnMut(&StorePath) -> std::result::Result<Hash, E>,
) -> Result<(), E> {
    check_supported(drv, name)?;
    if !drv.is_fixed_output() {
        // The hash covers the set of output names through these blanked
        // variables, so that adding an output changes every path.
        for (output, o) in drv.outputs.iter_mut() {
            *o = DerivationOutput::Deferred;
            drv.env
                .insert(BString::from(output.as_str()), BString::default());
        }
    }
    let paths = output_paths(store, drv, name, input_hash)?;
    for (output, path) in paths {
        drv.env.insert(
            BString::from(output.as_str()),
            BString::from(store.print_path(&path)),
        );
        let o = drv
            .outputs
            .get_mut(&output)
            .expect("paths come from outputs");
        match o {
            DerivationOutput::Fixed { path: p, .. } => *p = path,
            _ => *o = DerivationOutput::InputAddressed { path },
        }
    }
    Ok(())
}

/// The store path of the `.drv` file holding `aterm` (the printed
/// derivation) for a derivation named `name`: a text path whose references
/// are the input sources and input derivations.
pub fn drv_path_of(
    store: &StoreDir,
    drv: &Derivation,
    name: &str,
    aterm: &[u8],
) -> std::result::Result<StorePath, StorePathError> {
    store.make_text_path(
        &format!("{name}.drv"),
        &Hash::digest(HashAlgo::Sha256, aterm),
        &drv.references(),
    )
}

/// The store path the `.drv` file of `drv` (named `name`) gets when written.
pub fn drv_path(
    store: &StoreDir,
    drv: &Derivation,
    name: &str,
) -> std::result::Result<StorePath, StorePathError> {
    drv_path_of(store, drv, name, &aterm::print(store, drv))
}

/// Why [`DrvFileHashes`] could not hash a derivation.
#[derive(Debug, thiserror::Error)]
pub enum DrvFileError {
    #[error("'{0}' is not a derivation (its name does not end in .drv)")]
    NotDerivation(String),
    #[error("cannot read derivation '{drv_path}' from '{file}': {source}")]
    Read {
        drv_path: String,
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot parse derivation '{drv_path}' ({file}): {source}")]
    Parse {
        drv_path: String,
        file: PathBuf,
        source: AtermError,
    },
    #[error("derivation '{0}' depends on itself")]
    Cycle(String),
    #[error(
        "derivation '{drv_path}' needs output '{output}' of '{input}', which has no such output"
    )]
    NoSuchOutput {
        drv_path: String,
        input: String,
        output: String,
    },
    #[error("cannot hash derivation '{drv_path}': {source}")]
    Hash {
        drv_path: String,
        source: Box<HashModuloError<Infallible>>,
    },
}

/// Input derivation hashes read from `.drv` files in a directory (the
/// physical location of the store directory, e.g. `ROOT/nix/store` for a
/// chroot store), following their inputs recursively, with memoisation.
/// Like Nix, it refuses a derivation that needs an output its input does not
/// have.
#[derive(Debug)]
pub struct DrvFileHashes {
    store: StoreDir,
    dir: PathBuf,
    /// Hash modulo and output names of every derivation hashed so far.
    memo: HashMap<StorePath, (Hash, BTreeSet<String>)>,
}

impl DrvFileHashes {
    /// Reads derivations of `store` from `dir`, where `store`'s paths live.
    pub fn new(store: StoreDir, dir: impl Into<PathBuf>) -> Self {
        DrvFileHashes {
            store,
            dir: dir.into(),
            memo: HashMap::new(),
        }
    }

    /// The directory the files are read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the file of `drv_path` is on disk.
    pub fn file_of(&self, drv_path: &StorePath) -> PathBuf {
        self.dir.join(drv_path.base_name())
    }

    /// Reads and parses the derivation at `drv_path`.
    pub fn read(&self, drv_path: &StorePath) -> std::result::Result<Derivation, DrvFileError> {
        let file = self.file_of(drv_path);
        let text = std::fs::read(&file).map_err(|source| DrvFileError::Read {
            drv_path: self.store.print_path(drv_path),
            file: file.clone(),
            source,
        })?;
        aterm::parse(&self.store, &text).map_err(|source| DrvFileError::Parse {
            drv_path: self.store.print_path(drv_path),
            file,
            source,
        })
    }

    /// The (unmasked) hash modulo of the derivation at `drv_path`: what a
    /// derivation that depends on it puts in its place.
    pub fn hash_modulo(&mut self, drv_path: &StorePath) -> std::result::Result<Hash, DrvFileError> {
        if let Some((hash, _)) = self.memo.get(drv_path) {
            return Ok(*hash);
        }
        // An explicit stack rather than recursion: dependency chains (a
        // bootstrap of a whole distribution) can be deep, and a crafted
        // cycle must be an error, not a stack overflow.
        let mut stack: Vec<(StorePath, Derivation)> = Vec::new();
        let mut on_stack: HashSet<StorePath> = HashSet::new();
        let mut next = Some(drv_path.clone());
        loop {
            if let Some(path) = next.take() {
                let drv = self.read(&path)?;
                on_stack.insert(path.clone());
                stack.push((path, drv));
            }
            let Some((path, drv)) = stack.last() else {
                break;
            };
            let missing = drv
                .input_derivations
                .keys()
                .find(|input| !self.memo.contains_key(*input));
            if let Some(input) = missing {
                if on_stack.contains(input) {
                    return Err(DrvFileError::Cycle(self.store.print_path(input)));
                }
                next = Some(input.clone());
                continue;
            }
            let name = drv_name(path)
                .ok_or_else(|| DrvFileError::NotDerivation(self.store.print_path(path)))?;
            self.check_input_outputs(path, drv)?;
            let memo = &self.memo;
            let hash = hash_modulo(&self.store, drv, name, false, |input| {
                Ok::<_, Infallible>(memo[input].0)
            })
            .map_err(|source| DrvFileError::Hash {
                drv_path: self.store.print_path(path),
                source: Box::new(source),
            })?;
            let (path, drv) = stack.pop().expect("stack is not empty");
            on_stack.remove(&path);
            self.memo
                .insert(path, (hash, drv.outputs.into_keys().collect()));
        }
        Ok(self.memo[drv_path].0)
    }

    /// Checks that every output `drv` (at `drv_path`) takes from an input
    /// derivation exists, hashing the inputs on the way.
    pub fn check_input_outputs(
        &mut self,
        drv_path: &StorePath,
        drv: &Derivation,
    ) -> std::result::Result<(), DrvFileError> {
        for (input, outputs) in &drv.input_derivations {
            self.hash_modulo(input)?;
            let known = &self.memo[input].1;
            if let Some(output) = outputs.iter().find(|o| !known.contains(*o)) {
                return Err(DrvFileError::NoSuchOutput {
                    drv_path: self.store.print_path(drv_path),
                    input: self.store.print_path(input),
                    output: output.clone(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::derivation::{HashMethod, OutputHash};

    fn store() -> StoreDir {
        StoreDir::default()
    }

    fn no_inputs(_: &StorePath) -> std::result::Result<Hash, Infallible> {
        unreachable!("no input derivations")
    }

    /// `derivation { name = "fo"; system = "x86_64-linux"; builder = "/bin/sh";
    /// outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "0…0"; }`
    /// as instantiated by Nix 2.8.
    const FIXED: &str = r#"Derive([("out","/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo","r:sha256","0000000000000000000000000000000000000000000000000000000000000000")],[],[],"x86_64-linux","/bin/sh",[],[("builder","/bin/sh"),("name","fo"),("out","/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"),("outputHash","0000000000000000000000000000000000000000000000000000"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    /// A two-output derivation with no inputs, instantiated by Nix 2.8 as
    /// `/nix/store/a1vz6ql80xsx2k3bfnks0pc2v39flqx4-dep.drv`.
    const DEP: &str = r#"Derive([("dev","/nix/store/mql43cxy7jfzk5d7c311l2w95j8gp0v0-dep-dev","",""),("out","/nix/store/h5bw5vkd1vc7q486pbyjcr7b9iyb1vrq-dep","","")],[],[],"x86_64-linux","/bin/sh",["-c","echo > $out"],[("builder","/bin/sh"),("dev","/nix/store/mql43cxy7jfzk5d7c311l2w95j8gp0v0-dep-dev"),("name","dep"),("out","/nix/store/h5bw5vkd1vc7q486pbyjcr7b9iyb1vrq-dep"),("outputs","out dev"),("system","x86_64-linux")])"#;

    #[test]
    fn fixed_output_paths_and_drv_path() {
        let drv = aterm::parse(&store(), FIXED.as_bytes()).unwrap();
        let paths = output_paths(&store(), &drv, "fo", no_inputs).unwrap();
        assert_eq!(
            store().print_path(&paths["out"]),
            "/nix/store/j6pcdwmw2hmiy97jvz23dzwnapj7aj4g-fo"
        );
        assert_eq!(
            store().print_path(&drv_path(&store(), &drv, "fo").unwrap()),
            "/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv"
        );
    }

    #[test]
    fn input_addressed_paths_and_fill_in() {
        let drv = aterm::parse(&store(), DEP.as_bytes()).unwrap();
        let paths = output_paths(&store(), &drv, "dep", no_inputs).unwrap();
        assert_eq!(paths["out"], *drv.outputs["out"].path().unwrap());
        assert_eq!(paths["dev"], *drv.outputs["dev"].path().unwrap());
        assert_eq!(
            store().print_path(&drv_path(&store(), &drv, "dep").unwrap()),
            "/nix/store/a1vz6ql80xsx2k3bfnks0pc2v39flqx4-dep.drv"
        );

        let mut blank = drv.clone();
        for o in blank.outputs.values_mut() {
            *o = DerivationOutput::Deferred;
        }
        blank.env.remove(&BString::from("out"));
        blank.env.insert("dev".into(), "".into());
        fill_in_output_paths(&store(), &mut blank, "dep", no_inputs).unwrap();
        assert_eq!(blank, drv);
        assert_eq!(aterm::print(&store(), &blank), DEP.as_bytes());
    }

    #[test]
    fn inputs_are_replaced_by_their_hash_modulo() {
        let fixed = aterm::parse(&store(), FIXED.as_bytes()).unwrap();
        let fixed_hash = hash_modulo(&store(), &fixed, "fo", false, no_inputs).unwrap();
        // A different way of fetching the same content hashes the same.
        let mut other = fixed.clone();
        other.builder = "/bin/bash".into();
        assert_eq!(
            hash_modulo(&store(), &other, "fo", false, no_inputs).unwrap(),
            fixed_hash
        );
        let fo_path = store()
            .parse_path("/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv")
            .unwrap();
        let mut top = Derivation {
            outputs: [("out".to_owned(), DerivationOutput::Deferred)].into(),
            input_derivations: [(fo_path.clone(), ["out".to_owned()].into())].into(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            ..Derivation::default()
        };
        let lookups = std::cell::Cell::new(0);
        fill_in_output_paths(&store(), &mut top, "top", |p: &StorePath| {
            assert_eq!(*p, fo_path);
            lookups.set(lookups.get() + 1);
            Ok::<_, Infallible>(fixed_hash)
        })
        .unwrap();
        assert_eq!(lookups.get(), 1);
        assert!(matches!(
            top.outputs["out"],
            DerivationOutput::InputAddressed { .. }
        ));
        let err = output_paths(&store(), &top, "top", |_: &StorePath| {
            Err::<Hash, _>(std::io::Error::other("gone"))
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv")
        );
    }

    #[test]
    fn floating_and_bad_fixed_outputs_are_clear_errors() {
        let mut drv = Derivation {
            outputs: [(
                "out".to_owned(),
                DerivationOutput::Floating {
                    method: HashMethod::Recursive,
                    algo: HashAlgo::Sha256,
                },
            )]
            .into(),
            ..Derivation::default()
        };
        let err = output_paths(&store(), &drv, "ca", no_inputs).unwrap_err();
        assert!(
            err.to_string().contains("not support content-addressed"),
            "{err}"
        );
        let fixed = aterm::parse(&store(), FIXED.as_bytes()).unwrap();
        drv.outputs = fixed.outputs.clone();
        drv.outputs
            .insert("dev".into(), fixed.outputs["out"].clone());
        let err = output_paths(&store(), &drv, "fo", no_inputs).unwrap_err();
        assert!(err.to_string().contains("exactly one output"), "{err}");
    }

    #[test]
    fn drv_files_in_a_directory_are_hashed_recursively() {
        let dir = tempfile::tempdir().unwrap();
        let fo_path = store()
            .parse_path("/nix/store/dja7pnqjwq2l6kqisbsc7fmxgjn5rapl-fo.drv")
            .unwrap();
        std::fs::write(dir.path().join(fo_path.base_name()), FIXED).unwrap();
        let mut mid = Derivation {
            outputs: [("out".to_owned(), DerivationOutput::Deferred)].into(),
            input_derivations: [(fo_path.clone(), ["out".to_owned()].into())].into(),
            system: "x86_64-linux".into(),
            builder: "/bin/sh".into(),
            ..Derivation::default()
        };
        let mut files = DrvFileHashes::new(store(), dir.path());
        fill_in_output_paths(&store(), &mut mid, "mid", |p: &StorePath| {
            files.hash_modulo(p)
        })
        .unwrap();
        let mid_path = drv_path(&store(), &mid, "mid").unwrap();
        std::fs::write(
            dir.path().join(mid_path.base_name()),
            aterm::print(&store(), &mid),
        )
        .unwrap();
        let mut top = Derivation {
            outputs: [("out".to_owned(), DerivationOutput::Deferred)].into(),
            input_derivations: [(mid_path.clone(), ["out".to_owned()].into())].into(),
            ..mid.clone()
        };
        fill_in_output_paths(&store(), &mut top, "top", |p: &StorePath| {
            DrvFileHashes::new(store(), dir.path()).hash_modulo(p)
        })
        .unwrap();
        assert_ne!(top.outputs["out"], mid.outputs["out"]);

        // An output the input does not have is refused, as by Nix.
        let mut wrong = mid.clone();
        wrong.input_derivations = [(fo_path.clone(), ["dev".to_owned()].into())].into();
        let err = DrvFileHashes::new(store(), dir.path())
            .check_input_outputs(&mid_path, &wrong)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("needs output 'dev' of '/nix/store/dja7"),
            "{err}"
        );

        // A missing input is an error that names it.
        std::fs::remove_file(dir.path().join(fo_path.base_name())).unwrap();
        let err = DrvFileHashes::new(store(), dir.path())
            .hash_modulo(&mid_path)
            .unwrap_err();
        assert!(err.to_string().contains("-fo.drv"), "{err}");
    }

    #[test]
    fn fixed_text_output() {
        let hash = Hash::digest(HashAlgo::Sha256, b"hello");
        let output = OutputHash {
            method: HashMethod::Text,
            hash,
        };
        let path = output.store_path(&store(), "t", "out").unwrap();
        assert_eq!(
            path,
            store()
                .make_text_path("t", &hash, &Default::default())
                .unwrap()
        );
    }
}
