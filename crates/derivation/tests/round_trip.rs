//! Property tests: any derivation survives ATerm and JSON round trips.

use std::collections::{BTreeMap, BTreeSet};

use bstr::BString;
use kiln_derivation::{Derivation, DerivationOutput, HashMethod, OutputHash, aterm, json};
use kiln_formats::hash::{Hash, HashAlgo};
use kiln_formats::store_path::{StoreDir, StorePath};
use proptest::prelude::*;

fn store_path(suffix: &'static str) -> impl Strategy<Value = StorePath> {
    (any::<[u8; 20]>(), "[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]{0,30}").prop_map(move |(hash, name)| {
        StorePath::from_parts(&hash, &format!("{name}{suffix}")).unwrap()
    })
}

fn method() -> impl Strategy<Value = HashMethod> {
    prop_oneof![
        Just(HashMethod::Flat),
        Just(HashMethod::Recursive),
        Just(HashMethod::Text)
    ]
}

fn algo() -> impl Strategy<Value = HashAlgo> {
    prop::sample::select(HashAlgo::ALL.to_vec())
}

fn output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        store_path("").prop_map(|path| DerivationOutput::InputAddressed { path }),
        (method(), algo(), any::<[u8; 64]>(), store_path("")).prop_map(
            |(method, algo, bytes, path)| DerivationOutput::Fixed {
                hash: OutputHash {
                    method,
                    hash: Hash::new(algo, &bytes[..algo.digest_len()]).unwrap(),
                },
                path,
            }
        ),
        (method(), algo()).prop_map(|(method, algo)| DerivationOutput::Floating { method, algo }),
        Just(DerivationOutput::Deferred),
        (method(), algo()).prop_map(|(method, algo)| DerivationOutput::Impure { method, algo }),
    ]
}

fn output_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_-]{0,8}"
}

/// A derivation whose free-form strings come from `text`.
fn derivation(text: impl Strategy<Value = BString> + Clone) -> impl Strategy<Value = Derivation> {
    (
        prop::collection::btree_map(output_name(), output(), 0..5),
        prop::collection::btree_map(
            store_path(".drv"),
            prop::collection::btree_set(output_name(), 0..4),
            0..5,
        ),
        prop::collection::btree_set(store_path(""), 0..5),
        text.clone(),
        text.clone(),
        prop::collection::vec(text.clone(), 0..5),
        prop::collection::btree_map(text.clone(), text, 0..10),
    )
        .prop_map(
            |(outputs, input_derivations, input_sources, system, builder, args, env)| Derivation {
                outputs,
                input_derivations,
                input_sources,
                system,
                builder,
                args,
                env,
            },
        )
}

/// Any bytes, weighted towards the ones ATerm and JSON escape.
fn bytes() -> impl Strategy<Value = BString> + Clone {
    prop::collection::vec(
        prop_oneof![
            prop::sample::select(b"\"\\\n\r\t\x00\x01\x7f ()[],".to_vec()),
            any::<u8>()
        ],
        0..24,
    )
    .prop_map(BString::from)
}

fn utf8() -> impl Strategy<Value = BString> + Clone {
    prop_oneof![any::<String>(), "[\"\\\\\n\r\t\u{1}\u{7f} a-z]{0,12}"].prop_map(BString::from)
}

proptest! {
    #[test]
    fn aterm_round_trips(drv in derivation(bytes())) {
        let store = StoreDir::default();
        let text = aterm::print(&store, &drv);
        let parsed = aterm::parse(&store, &text).unwrap();
        prop_assert_eq!(&parsed, &drv);
        prop_assert_eq!(aterm::print(&store, &parsed), text);
    }

    #[test]
    fn json_round_trips(drv in derivation(utf8()), drv_path in store_path(".drv")) {
        let store = StoreDir::default();
        let text = json::print(&store, [(&drv_path, &drv)]);
        let text = String::from_utf8(text).unwrap();
        let parsed = json::parse(&store, &text).unwrap();
        prop_assert_eq!(parsed.len(), 1);
        prop_assert_eq!(parsed[0].drv_path.as_ref(), Some(&drv_path));
        prop_assert_eq!(&parsed[0].derivation, &drv);
        // serde_json agrees that it is JSON, and on every string's value.
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let env = value[store.print_path(&drv_path)]["env"].as_object().unwrap();
        prop_assert_eq!(env.len(), drv.env.len());
        for (k, v) in &drv.env {
            prop_assert_eq!(env[&k.to_string()].as_str().unwrap(), v.to_string());
        }
    }

    #[test]
    fn parser_never_panics(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = aterm::parse(&StoreDir::default(), &data);
    }

    #[test]
    fn parser_never_panics_on_damaged_derivations(
        drv in derivation(bytes()),
        cut in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let store = StoreDir::default();
        let mut text = aterm::print(&store, &drv);
        let i = cut.index(text.len());
        text[i] = byte;
        if let Ok(parsed) = aterm::parse(&store, &text) {
            prop_assert_eq!(aterm::parse(&store, &aterm::print(&store, &parsed)).unwrap(), parsed);
        }
        let _ = aterm::parse(&store, &text[..i]);
    }
}

#[test]
fn many_outputs_and_inputs() {
    let store = StoreDir::default();
    let path = |i: usize, suffix: &str| {
        StorePath::from_parts(&[i as u8; 20], &format!("p{i}{suffix}")).unwrap()
    };
    let drv = Derivation {
        outputs: (0..200)
            .map(|i| {
                (
                    format!("o{i}"),
                    DerivationOutput::InputAddressed { path: path(i, "") },
                )
            })
            .collect(),
        input_derivations: (0..200)
            .map(|i| (path(i, ".drv"), BTreeSet::from([format!("o{i}")])))
            .collect(),
        input_sources: (0..200).map(|i| path(i, "-src")).collect(),
        env: (0..1000)
            .map(|i| (BString::from(format!("k{i}")), BString::from("v".repeat(i))))
            .collect::<BTreeMap<_, _>>(),
        ..Derivation::default()
    };
    let text = aterm::print(&store, &drv);
    assert_eq!(aterm::parse(&store, &text).unwrap(), drv);
}

/// Input derivation hashes for the properties: any fixed function of the path.
fn fake_input_hash(path: &StorePath) -> Result<Hash, std::convert::Infallible> {
    Ok(Hash::digest(HashAlgo::Sha256, path.base_name()))
}

fn without_floating(mut drv: Derivation) -> Derivation {
    drv.outputs.retain(|_, o| {
        matches!(
            o,
            DerivationOutput::InputAddressed { .. } | DerivationOutput::Deferred
        )
    });
    drv
}

proptest! {
    #[test]
    fn filled_in_paths_are_the_computed_ones_and_stable(
        drv in derivation(bytes()).prop_map(without_floating)
    ) {
        use kiln_derivation::hash_modulo::{fill_in_output_paths, output_paths};
        let store = StoreDir::default();
        let mut filled = drv.clone();
        fill_in_output_paths(&store, &mut filled, "name", fake_input_hash).unwrap();
        let computed = output_paths(&store, &filled, "name", fake_input_hash).unwrap();
        let recorded: BTreeMap<String, StorePath> = filled
            .output_paths()
            .map(|(o, p)| (o.to_owned(), p.clone()))
            .collect();
        prop_assert_eq!(&computed, &recorded);
        prop_assert_eq!(computed.len(), drv.outputs.len());
        for (output, path) in &computed {
            let env = filled.env.get(output.as_bytes()).unwrap();
            prop_assert_eq!(env.to_string(), store.print_path(path));
        }
        let mut again = filled.clone();
        fill_in_output_paths(&store, &mut again, "name", fake_input_hash).unwrap();
        prop_assert_eq!(again, filled);
    }
}
