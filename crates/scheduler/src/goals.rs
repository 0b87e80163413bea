//! The goal graph and the worker loop that drives it.
//!
//! One goal per derivation: discovery loads every `.drv` reachable from the
//! targets (in batches, on blocking threads) and stops at derivations whose
//! wanted outputs are valid already; then the worker loop starts the goals
//! whose inputs are done, up to `max-jobs` at a time, each on a blocking
//! thread, and reacts to each ending: dependents become ready, or fail with
//! `DependencyFailed`. Everything the loop does per goal is O(1) apart from
//! walking its edges, so a run is linear in the size of the graph.
//!
//! What loading and building mean is the [`Backend`]'s business: the local
//! store and sandbox ([`crate::local::LocalBackend`]), or an in-memory graph
//! in the scale tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kiln_formats::store_path::{StoreDir, StorePath};
use tokio::task::JoinSet;

use crate::events::{Event, EventSink, next_activity_id};
use crate::result::{BuildResult, BuildStatus};

/// How long a build the hook postponed waits before it is offered again
/// when nothing of ours ends meanwhile (Nix polls every 5 s).
const POSTPONED_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wanted {
    All,
    Names(BTreeSet<String>),
}

impl Wanted {
    fn merge(&mut self, other: &Wanted) -> bool {
        match (&mut *self, other) {
            (Wanted::All, _) => false,
            (_, Wanted::All) => {
                *self = Wanted::All;
                true
            }
            (Wanted::Names(a), Wanted::Names(b)) => {
                let before = a.len();
                a.extend(b.iter().cloned());
                a.len() != before
            }
        }
    }

    /// Whether output `name` is wanted.
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Wanted::All => true,
            Wanted::Names(n) => n.contains(name),
        }
    }
}

/// A derivation as loaded by a backend.
#[derive(Debug)]
pub struct Loaded<D> {
    /// Input derivations and the outputs of each that are needed.
    pub inputs: Vec<(StorePath, BTreeSet<String>)>,
    /// The wanted outputs are all valid: nothing to do.
    pub valid: Option<BTreeMap<String, StorePath>>,
    /// How the outputs in `valid` came to be valid, when they were not
    /// before: substituted (paths fetched, each with the cache it came
    /// from), or — in a dry run — would be.
    pub substituted: Option<Substitution>,
    pub drv: D,
}

/// Outputs fetched from binary caches instead of built.
#[derive(Debug, Clone, Default)]
pub struct Substitution {
    /// Each path fetched (the outputs and what they refer to), the URL
    /// of the cache it came from, and its NAR size.
    pub fetched: Vec<(StorePath, String, u64)>,
    /// Only found out (dry run): nothing was fetched.
    pub dry_run: bool,
}

/// One build for a backend to run.
#[derive(Debug)]
pub struct Job<D> {
    pub id: u64,
    pub drv_path: StorePath,
    pub drv: Arc<D>,
    pub wanted: Wanted,
}

/// What a build attempt came to.
#[derive(Debug)]
pub enum Attempt<L> {
    Done(BuildResult),
    /// Another process holds an output lock: wait for it without a slot.
    Contended,
    /// The lock was waited for and is held now.
    Locked(L),
}

/// What the build hook said about a job.
#[derive(Debug)]
pub enum HookReply<R> {
    Accept(R),
    Decline,
    DeclinePermanently,
    Postpone,
}

/// Cancellation shared by the running builds of one run.
#[derive(Debug, Default)]
pub struct Cancel {
    flag: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Cancel {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// Loading and building derivations. Methods are blocking; the loop calls
/// them on blocking threads.
pub trait Backend: Send + Sync + 'static {
    /// A loaded derivation.
    type Drv: Send + Sync + 'static;
    /// Held output locks.
    type Lock: Send + 'static;
    /// An accepted remote build.
    type Remote: Send + 'static;

    fn store_dir(&self) -> &StoreDir;

    /// Reads `drv_path` and checks whether `wanted` outputs are valid.
    fn load(&self, drv_path: &StorePath, wanted: &Wanted)
    -> Result<Loaded<Self::Drv>, BuildResult>;

    /// Builds `job`: locks its outputs (without waiting: `Contended` if
    /// another process holds one, unless `lock` is given), re-checks
    /// validity, builds and registers.
    fn build(
        &self,
        job: &Job<Self::Drv>,
        lock: Option<Self::Lock>,
        cancel: &Cancel,
        events: &dyn EventSink,
    ) -> Attempt<Self::Lock>;

    /// Waits for the output locks of `job`: `Locked`, or `Done` when the
    /// other holder made the outputs valid.
    fn wait_for_locks(&self, job: &Job<Self::Drv>) -> Attempt<Self::Lock>;

    /// Waits for work the backend does in the background once every
    /// build has ended; returns goals whose result it overrides (outputs
    /// that could not be registered after all).
    fn finish(&self) -> Vec<(StorePath, BuildResult)> {
        Vec::new()
    }

    /// Takes the output locks of `job` without waiting, before it is
    /// offered to the build hook (which registers the outputs under them):
    /// `Locked`, `Contended` when another process holds one, or `Done` when
    /// the outputs turned valid meanwhile. Only called when
    /// [`Backend::has_hook`]; the default waits for the locks.
    fn lock_outputs(&self, job: &Job<Self::Drv>) -> Attempt<Self::Lock> {
        self.wait_for_locks(job)
    }

    /// Whether a build hook is configured.
    fn has_hook(&self) -> bool {
        false
    }

    /// Where `job` may be built; the default is anywhere.
    fn placement(&self, _job: &Job<Self::Drv>) -> Placement {
        Placement::Anywhere
    }

    /// Offers `job` to the build hook.
    fn offer_to_hook(&self, _job: &Job<Self::Drv>, _slot_free: bool) -> HookReply<Self::Remote> {
        HookReply::DeclinePermanently
    }

    /// Runs a build the hook accepted.
    fn build_remote(
        &self,
        _job: &Job<Self::Drv>,
        _remote: Self::Remote,
        _events: &dyn EventSink,
    ) -> BuildResult {
        BuildResult::failure(BuildStatus::MiscFailure, "no build hook")
    }
}

/// Where a build may run, as Nix decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Offered to the build hook first, if there is one.
    Anywhere,
    /// Here, without asking the hook (`preferLocalBuild` on a machine that
    /// can build it).
    Here,
    /// Here, even when `max-jobs` is 0 and no slot is free: a builtin
    /// builder, which only this machine's scheduler runs, and cheaply.
    HereWithoutSlot,
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub max_jobs: usize,
    pub keep_going: bool,
    /// Only find out what would be built.
    pub dry_run: bool,
}

/// What a run came to: a result per goal that got one, by `.drv` path.
#[derive(Debug, Default)]
pub struct RunReport {
    pub results: BTreeMap<StorePath, BuildResult>,
    /// Results of the targets, in the order given.
    pub targets: Vec<(StorePath, BuildResult)>,
    /// With `dry_run`: the derivations that would be built.
    pub would_build: Vec<StorePath>,
    /// With `dry_run`: the paths that would be fetched from binary caches.
    pub would_substitute: Vec<StorePath>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Unloaded,
    NeedsBuild,
    Ready,
    Running,
    Postponed,
    Done,
}

struct Goal<D, L> {
    path: StorePath,
    wanted: Wanted,
    drv: Option<Arc<D>>,
    inputs: Vec<usize>,
    dependents: Vec<usize>,
    pending: usize,
    state: State,
    result: Option<BuildResult>,
    lock: Option<L>,
    id: u64,
    hook_asked: bool,
    remote: bool,
}

enum Finished<B: Backend> {
    Loaded(Vec<(usize, Result<Loaded<B::Drv>, BuildResult>)>),
    Build(usize, Attempt<B::Lock>),
    /// The hook's reply, with the output locks taken before asking; or,
    /// when they could not be taken, what locking came to.
    Hook(
        usize,
        Result<(HookReply<B::Remote>, B::Lock), Attempt<B::Lock>>,
    ),
}

/// Realises `targets` (`.drv` path and wanted outputs) with `backend`.
pub async fn run<B: Backend>(
    backend: Arc<B>,
    targets: Vec<(StorePath, Wanted)>,
    options: RunOptions,
    events: Arc<dyn EventSink>,
) -> RunReport {
    run_cancellable(backend, targets, options, events, Arc::default()).await
}

/// [`run`], which the caller can also stop through `cancel` (a daemon
/// whose client hung up): running builds are killed, no new one starts.
pub async fn run_cancellable<B: Backend>(
    backend: Arc<B>,
    targets: Vec<(StorePath, Wanted)>,
    options: RunOptions,
    events: Arc<dyn EventSink>,
    cancel: Arc<Cancel>,
) -> RunReport {
    let mut run = Run::<B> {
        backend,
        events,
        goals: Vec::new(),
        index: HashMap::new(),
        tasks: JoinSet::new(),
        cancel,
        options,
        running_local: 0,
        running_total: 0,
        stop: false,
        hook_enabled: false,
        done: 0,
        failed: 0,
        to_build: 0,
        would_substitute: Vec::new(),
    };
    run.hook_enabled = run.backend.has_hook();
    let roots: Vec<usize> = targets
        .into_iter()
        .map(|(path, wanted)| run.goal(path, &wanted))
        .collect();
    run.discover().await;
    let mut report = RunReport::default();
    if run.options.dry_run {
        report.would_substitute = run.would_substitute.clone();
        report.would_build = run
            .goals
            .iter()
            .filter(|g| g.state == State::NeedsBuild)
            .map(|g| g.path.clone())
            .collect();
        for g in &run.goals {
            if let (State::Done, Some(r)) = (g.state, &g.result) {
                report.results.insert(g.path.clone(), r.clone());
            }
        }
        return report;
    }
    run.execute().await;
    let backend = run.backend.clone();
    let late = tokio::task::spawn_blocking(move || backend.finish())
        .await
        .unwrap_or_default();
    for (path, result) in late {
        if let Some(&i) = run.index.get(&path) {
            run.goals[i].result = Some(result);
        }
    }
    let not_attempted = || {
        BuildResult::failure(
            BuildStatus::MiscFailure,
            "not built: another build failed (use --keep-going to build everything that can be)",
        )
    };
    for &r in &roots {
        let g = &run.goals[r];
        report.targets.push((
            g.path.clone(),
            g.result.clone().unwrap_or_else(not_attempted),
        ));
    }
    for g in run.goals {
        if let Some(result) = g.result {
            report.results.insert(g.path, result);
        }
    }
    report
}

struct Run<B: Backend> {
    backend: Arc<B>,
    events: Arc<dyn EventSink>,
    goals: Vec<Goal<B::Drv, B::Lock>>,
    index: HashMap<StorePath, usize>,
    tasks: JoinSet<Finished<B>>,
    cancel: Arc<Cancel>,
    options: RunOptions,
    running_local: usize,
    running_total: usize,
    stop: bool,
    hook_enabled: bool,
    done: usize,
    failed: usize,
    to_build: usize,
    would_substitute: Vec<StorePath>,
}

/// Goals loaded per blocking call during discovery.
const LOAD_BATCH: usize = 512;

impl<B: Backend> Run<B> {
    fn goal(&mut self, path: StorePath, wanted: &Wanted) -> usize {
        if let Some(&i) = self.index.get(&path) {
            let g = &mut self.goals[i];
            // A goal found valid for fewer outputs is looked at again.
            if g.wanted.merge(wanted) && g.state == State::Done {
                g.state = State::Unloaded;
                g.result = None;
            }
            return i;
        }
        let i = self.goals.len();
        self.goals.push(Goal {
            path: path.clone(),
            wanted: wanted.clone(),
            drv: None,
            inputs: Vec::new(),
            dependents: Vec::new(),
            pending: 0,
            state: State::Unloaded,
            result: None,
            lock: None,
            id: 0,
            hook_asked: false,
            remote: false,
        });
        self.index.insert(path, i);
        i
    }

    async fn discover(&mut self) {
        loop {
            let frontier: Vec<usize> = (0..self.goals.len())
                .filter(|&i| self.goals[i].state == State::Unloaded)
                .collect();
            if frontier.is_empty() {
                break;
            }
            for chunk in frontier.chunks(LOAD_BATCH) {
                let backend = self.backend.clone();
                let batch: Vec<(usize, StorePath, Wanted)> = chunk
                    .iter()
                    .map(|&i| (i, self.goals[i].path.clone(), self.goals[i].wanted.clone()))
                    .collect();
                for &i in chunk {
                    // Marked so the next frontier does not take it again.
                    self.goals[i].state = State::Running;
                }
                self.tasks.spawn_blocking(move || {
                    Finished::Loaded(
                        batch
                            .into_iter()
                            .map(|(i, path, wanted)| (i, backend.load(&path, &wanted)))
                            .collect(),
                    )
                });
            }
            while let Some(joined) = self.tasks.join_next().await {
                let Ok(Finished::Loaded(loaded)) = joined else {
                    continue;
                };
                for (i, result) in loaded {
                    self.loaded(i, result);
                }
            }
        }
    }

    fn loaded(&mut self, i: usize, result: Result<Loaded<B::Drv>, BuildResult>) {
        match result {
            Err(failure) => {
                self.goals[i].state = State::Done;
                self.goals[i].result = Some(failure);
            }
            Ok(loaded) => {
                self.goals[i].drv = Some(Arc::new(loaded.drv));
                if let Some(outputs) = loaded.valid {
                    let status = match loaded.substituted {
                        Some(s) if s.dry_run => {
                            self.would_substitute
                                .extend(s.fetched.into_iter().map(|(p, _, _)| p));
                            BuildStatus::Substituted
                        }
                        Some(s) => {
                            let store_dir = self.backend.store_dir();
                            for (path, from, nar_size) in &s.fetched {
                                let text = format!(
                                    "copied path '{}' from '{from}'",
                                    store_dir.display(path)
                                );
                                self.events.event(Event::Message { text: &text });
                                self.events.event(Event::Copied {
                                    path,
                                    from,
                                    nar_size: *nar_size,
                                });
                            }
                            BuildStatus::Substituted
                        }
                        None => BuildStatus::AlreadyValid,
                    };
                    self.goals[i].state = State::Done;
                    self.goals[i].result = Some(BuildResult::success(status, outputs));
                    return;
                }
                self.goals[i].state = State::NeedsBuild;
                let mut inputs = Vec::with_capacity(loaded.inputs.len());
                for (path, outputs) in loaded.inputs {
                    inputs.push(self.goal(path, &Wanted::Names(outputs)));
                }
                self.goals[i].inputs = inputs;
            }
        }
    }

    async fn execute(&mut self) {
        // Edges and counts once the graph is complete.
        let mut ready = VecDeque::new();
        for i in 0..self.goals.len() {
            if self.goals[i].state != State::NeedsBuild {
                continue;
            }
            self.to_build += 1;
            let inputs = std::mem::take(&mut self.goals[i].inputs);
            let mut pending = 0;
            let mut failed_input = None;
            for &d in &inputs {
                self.goals[d].dependents.push(i);
                match (&self.goals[d].state, &self.goals[d].result) {
                    (State::Done, Some(r)) if r.status.is_success() => {}
                    (State::Done, Some(_)) => failed_input = Some(d),
                    _ => pending += 1,
                }
            }
            self.goals[i].inputs = inputs;
            self.goals[i].pending = pending;
            if let Some(d) = failed_input {
                self.goals[i].pending = usize::MAX; // never becomes ready
                let _ = d;
            } else if pending == 0 {
                self.goals[i].state = State::Ready;
                ready.push_back(i);
            }
        }
        self.events.event(Event::Planned {
            to_build: self.to_build,
        });
        // Goals that failed to load fail their dependents now.
        for i in 0..self.goals.len() {
            if self.goals[i].state == State::Done
                && !self.goals[i]
                    .result
                    .as_ref()
                    .is_some_and(|r| r.status.is_success())
            {
                self.fail_dependents(i);
            }
        }
        let mut postponed: Vec<usize> = Vec::new();
        loop {
            self.start_ready(&mut ready);
            let joined = if postponed.is_empty() || self.stop {
                self.tasks.join_next().await
            } else if self.tasks.is_empty() && self.options.max_jobs > 0 {
                // Nothing runs here, and a local slot is free: build here
                // rather than wait for the machines.
                self.hook_enabled = false;
                ready.extend(postponed.drain(..));
                continue;
            } else {
                // The machines are busy, maybe with other processes' builds:
                // ask the hook again now and then, as Nix does, and at once
                // when one of ours ends.
                tokio::select! {
                    joined = self.tasks.join_next(), if !self.tasks.is_empty() => joined,
                    () = tokio::time::sleep(POSTPONED_RETRY) => {
                        for p in postponed.drain(..) {
                            self.goals[p].state = State::Ready;
                            self.goals[p].hook_asked = false;
                            ready.push_back(p);
                        }
                        continue;
                    }
                }
            };
            let Some(joined) = joined else {
                break;
            };
            let finished = match joined {
                Ok(f) => f,
                Err(e) => {
                    // A panicking backend: the goal is unknown here, so only
                    // stop the run rather than leave it hanging.
                    tracing::error!(error = %e, "a build task panicked");
                    self.stop = true;
                    self.cancel.cancel();
                    continue;
                }
            };
            match finished {
                Finished::Loaded(_) => {}
                Finished::Hook(i, offered) => {
                    self.running_total -= 1;
                    match offered {
                        Ok((HookReply::Accept(remote), lock)) => self.start_remote(i, remote, lock),
                        Ok((HookReply::Decline, lock)) => {
                            self.goals[i].lock = Some(lock);
                            ready.push_front(i);
                        }
                        Ok((HookReply::DeclinePermanently, lock)) => {
                            self.hook_enabled = false;
                            self.goals[i].lock = Some(lock);
                            ready.push_front(i);
                        }
                        Ok((HookReply::Postpone, lock)) => {
                            // As Nix: a postponed goal does not keep its locks.
                            tokio::task::spawn_blocking(move || drop(lock));
                            self.goals[i].state = State::Postponed;
                            postponed.push(i);
                        }
                        Err(Attempt::Contended) => {
                            // Not asked after all: ask once the locks are ours.
                            self.goals[i].hook_asked = false;
                            self.wait_locks(i);
                        }
                        Err(Attempt::Locked(lock)) => {
                            self.goals[i].hook_asked = false;
                            self.goals[i].lock = Some(lock);
                            ready.push_front(i);
                        }
                        Err(Attempt::Done(result)) => {
                            self.finish(i, result, &mut ready);
                            for p in postponed.drain(..) {
                                self.goals[p].state = State::Ready;
                                self.goals[p].hook_asked = false;
                                ready.push_back(p);
                            }
                        }
                    }
                }
                Finished::Build(i, attempt) => {
                    if self.goals[i].state == State::Running {
                        self.running_total -= 1;
                    }
                    match attempt {
                        Attempt::Done(result) => {
                            if self.goals[i].state == State::Running && !self.goals[i].remote {
                                self.running_local -= 1;
                            }
                            self.finish(i, result, &mut ready);
                            // Something finished: the hook may take postponed goals now.
                            for p in postponed.drain(..) {
                                self.goals[p].state = State::Ready;
                                self.goals[p].hook_asked = false;
                                ready.push_back(p);
                            }
                        }
                        Attempt::Contended => {
                            self.running_local -= 1;
                            self.wait_locks(i);
                        }
                        Attempt::Locked(lock) => {
                            self.goals[i].lock = Some(lock);
                            self.goals[i].state = State::Ready;
                            ready.push_front(i);
                        }
                    }
                }
            }
        }
    }

    fn job(&self, i: usize) -> Job<B::Drv> {
        let g = &self.goals[i];
        Job {
            id: g.id,
            drv_path: g.path.clone(),
            drv: g.drv.clone().expect("loaded before it runs"),
            wanted: g.wanted.clone(),
        }
    }

    fn start_ready(&mut self, ready: &mut VecDeque<usize>) {
        while !self.stop && !self.cancel.is_cancelled() {
            let slot_free = self.running_local < self.options.max_jobs;
            if !slot_free && !self.hook_enabled {
                break;
            }
            let Some(i) = ready.pop_front() else { break };
            if self.goals[i].id == 0 {
                self.goals[i].id = next_activity_id();
            }
            let job = self.job(i);
            let placement = self.backend.placement(&job);
            if self.hook_enabled && !self.goals[i].hook_asked && placement == Placement::Anywhere {
                self.goals[i].hook_asked = true;
                self.goals[i].state = State::Running;
                self.running_total += 1;
                let backend = self.backend.clone();
                let lock = self.goals[i].lock.take();
                // The outputs are locked before the hook is asked, as Nix
                // does, so two processes never hand the same build out.
                self.tasks.spawn_blocking(move || {
                    let lock = match lock {
                        Some(l) => l,
                        None => match backend.lock_outputs(&job) {
                            Attempt::Locked(l) => l,
                            other => return Finished::Hook(i, Err(other)),
                        },
                    };
                    Finished::Hook(i, Ok((backend.offer_to_hook(&job, slot_free), lock)))
                });
                continue;
            }
            if self.options.max_jobs == 0 && placement != Placement::HereWithoutSlot {
                self.finish(
                    i,
                    BuildResult::failure(
                        BuildStatus::MiscFailure,
                        format!(
                            "unable to start any build of '{}'; either increase '--max-jobs' or enable remote builds",
                            self.backend.store_dir().display(&self.goals[i].path)
                        ),
                    ),
                    ready,
                );
                continue;
            }
            if !slot_free && placement != Placement::HereWithoutSlot {
                // The hook declined and no local slot is free: wait for one.
                ready.push_front(i);
                break;
            }
            self.goals[i].state = State::Running;
            self.running_local += 1;
            self.running_total += 1;
            let backend = self.backend.clone();
            let lock = self.goals[i].lock.take();
            let cancel = self.cancel.clone();
            let events = self.events.clone();
            self.tasks.spawn_blocking(move || {
                Finished::Build(i, backend.build(&job, lock, &cancel, &*events))
            });
        }
    }

    fn start_remote(&mut self, i: usize, remote: B::Remote, lock: B::Lock) {
        self.goals[i].state = State::Running;
        self.goals[i].remote = true;
        self.running_total += 1;
        let backend = self.backend.clone();
        let job = self.job(i);
        let events = self.events.clone();
        // Remote builds take no local slot. The output locks are held
        // until the hook has registered the outputs and exited.
        self.tasks.spawn_blocking(move || {
            let result = backend.build_remote(&job, remote, &*events);
            drop(lock);
            Finished::Build(i, Attempt::Done(result))
        });
    }

    fn wait_locks(&mut self, i: usize) {
        self.goals[i].state = State::Postponed;
        let backend = self.backend.clone();
        let job = self.job(i);
        self.tasks
            .spawn_blocking(move || Finished::Build(i, backend.wait_for_locks(&job)));
    }

    fn finish(&mut self, i: usize, result: BuildResult, ready: &mut VecDeque<usize>) {
        let ok = result.status.is_success();
        self.events.event(Event::Finished {
            id: self.goals[i].id,
            drv: &self.goals[i].path,
            result: &result,
        });
        self.goals[i].state = State::Done;
        self.goals[i].result = Some(result);
        self.done += 1;
        if ok {
            let dependents = std::mem::take(&mut self.goals[i].dependents);
            for &d in &dependents {
                let g = &mut self.goals[d];
                if g.pending == usize::MAX {
                    continue;
                }
                g.pending -= 1;
                if g.pending == 0 && g.state == State::NeedsBuild {
                    g.state = State::Ready;
                    ready.push_back(d);
                }
            }
            self.goals[i].dependents = dependents;
        } else {
            self.failed += 1;
            if !self.options.keep_going && !self.stop {
                self.stop = true;
                self.cancel.cancel();
            }
            self.fail_dependents(i);
        }
        self.events.event(Event::Progress {
            done: self.done,
            expected: self.to_build,
            running: self.running_total,
            failed: self.failed,
        });
    }

    /// Marks everything that depends on failed goal `i`, transitively, as
    /// `DependencyFailed` (each once, naming its failed inputs).
    fn fail_dependents(&mut self, i: usize) {
        let mut stack = vec![i];
        while let Some(f) = stack.pop() {
            let dependents = self.goals[f].dependents.clone();
            for d in dependents {
                if self.goals[d].state == State::Done {
                    continue;
                }
                let failed: Vec<String> = self.goals[d]
                    .inputs
                    .iter()
                    .filter(|&&x| {
                        self.goals[x].state == State::Done
                            && !self.goals[x]
                                .result
                                .as_ref()
                                .is_some_and(|r| r.status.is_success())
                    })
                    .map(|&x| {
                        format!(
                            "'{}'",
                            self.backend.store_dir().display(&self.goals[x].path)
                        )
                    })
                    .collect();
                let error = format!(
                    "{} dependencies of derivation '{}' failed to build: {}",
                    failed.len(),
                    self.backend.store_dir().display(&self.goals[d].path),
                    failed.join(", ")
                );
                self.goals[d].state = State::Done;
                self.goals[d].pending = usize::MAX;
                self.goals[d].result =
                    Some(BuildResult::failure(BuildStatus::DependencyFailed, error));
                stack.push(d);
            }
        }
    }
}
