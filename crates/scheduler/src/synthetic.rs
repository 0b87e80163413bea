//! A synthetic derivation graph with an in-process builder that does
//! nothing, for measuring the scheduler's own cost (the scale test and
//! `cargo xtask bench scheduler`). Node `i` depends on `i - 1` and up to three
//! pseudo-random earlier nodes; the builder records that each node is built
//! exactly once and only after its inputs.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use kiln_formats::store_path::{StoreDir, StorePath};

use crate::events::{EventSink, Quiet};
use crate::goals::{self, Attempt, Backend, Cancel, Job, Loaded, RunOptions, RunReport, Wanted};
use crate::result::{BuildResult, BuildStatus};

/// The graph and what its builder saw.
#[derive(Debug)]
pub struct SyntheticGraph {
    store_dir: StoreDir,
    paths: Vec<StorePath>,
    index: HashMap<StorePath, usize>,
    inputs: Vec<Vec<usize>>,
    built: Vec<AtomicU32>,
    order_violations: AtomicUsize,
}

fn pseudo_random_inputs(i: usize) -> Vec<usize> {
    if i == 0 {
        return Vec::new();
    }
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut deps = BTreeSet::new();
    for _ in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        deps.insert((x % i as u64) as usize);
    }
    deps.insert(i - 1);
    deps.into_iter().collect()
}

impl SyntheticGraph {
    /// A graph of `n` derivations.
    pub fn new(n: usize) -> SyntheticGraph {
        let paths: Vec<StorePath> = (0..n)
            .map(|i| {
                let mut hash = [0u8; 20];
                hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
                StorePath::from_parts(&hash, &format!("node-{i}.drv")).expect("a valid name")
            })
            .collect();
        SyntheticGraph {
            store_dir: StoreDir::default(),
            index: paths
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, p)| (p, i))
                .collect(),
            inputs: (0..n).map(pseudo_random_inputs).collect(),
            built: (0..n).map(|_| AtomicU32::new(0)).collect(),
            order_violations: AtomicUsize::new(0),
            paths,
        }
    }

    /// Builds every node, each one a target (as when a CI evaluation asks
    /// for all its jobs), `max_jobs` at a time, with no events reported.
    pub async fn build_all(self: Arc<Self>, max_jobs: usize) -> RunReport {
        let targets = self
            .paths()
            .iter()
            .map(|p| (p.clone(), Wanted::All))
            .collect();
        let options = RunOptions {
            max_jobs,
            keep_going: false,
            dry_run: false,
        };
        goals::run(self, targets, options, Arc::new(Quiet)).await
    }

    /// The `.drv` path of every node.
    pub fn paths(&self) -> &[StorePath] {
        &self.paths
    }

    /// How often each node was built.
    pub fn build_counts(&self) -> Vec<u32> {
        self.built
            .iter()
            .map(|b| b.load(Ordering::SeqCst))
            .collect()
    }

    /// Builds that started before one of their inputs was built.
    pub fn order_violations(&self) -> usize {
        self.order_violations.load(Ordering::SeqCst)
    }
}

impl Backend for SyntheticGraph {
    type Drv = usize;
    type Lock = ();
    type Remote = ();

    fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    fn load(&self, drv_path: &StorePath, _: &Wanted) -> Result<Loaded<usize>, BuildResult> {
        let i = *self.index.get(drv_path).ok_or_else(|| {
            BuildResult::failure(BuildStatus::MiscFailure, "not a node of the graph")
        })?;
        Ok(Loaded {
            inputs: self.inputs[i]
                .iter()
                .map(|&d| (self.paths[d].clone(), BTreeSet::new()))
                .collect(),
            valid: None,
            substituted: None,
            drv: i,
        })
    }

    fn build(&self, job: &Job<usize>, _: Option<()>, _: &Cancel, _: &dyn EventSink) -> Attempt<()> {
        let i = *job.drv;
        if self.inputs[i]
            .iter()
            .any(|&d| self.built[d].load(Ordering::SeqCst) == 0)
        {
            self.order_violations.fetch_add(1, Ordering::Relaxed);
        }
        self.built[i].fetch_add(1, Ordering::SeqCst);
        Attempt::Done(BuildResult::success(BuildStatus::Built, Default::default()))
    }

    fn wait_for_locks(&self, _: &Job<usize>) -> Attempt<()> {
        Attempt::Locked(())
    }
}
