//! The agent's loop: find and bootstrap machines, poll controllers, run each
//! task in a throwaway overlay under watchdogs, and post the signed result.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_formats::signature::SecretKey;
use rand::Rng as _;

use crate::channel::{Channel, ChannelError, GuestTask};
use crate::controller::{ControllerClient, ControllerError, check_task};
use crate::lock::{LockError, MachineLock};
use crate::machine::{
    BootstrapState, BootstrappedManifest, Machine, MachineError, MachineManifest, bootstrap_state,
    enumerate, write_toml,
};
use crate::protocol::{
    InteractiveMode, MachineHeader, ResultManifest, ResultRequest, ResultStatus, Task, TaskRequest,
    TaskResponse, key_fingerprint, sign_challenge,
};
use crate::qemu::{Accel, QemuError, Vm, VmSpec, create_overlay, probe_kvm};

/// The agent's version, recorded in bootstrapped manifests.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// What went wrong in the agent (a failing task is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Machine(#[from] MachineError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("machine '{0}' is a fake (--fake-machine) and can only be used with --fake-build")]
    FakeMachine(String),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AgentError {
    let path = path.to_owned();
    move |source| AgentError::Io {
        action,
        path,
        source,
    }
}

/// Which accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM if a probe VM boots with it, else TCG with a warning.
    Auto,
    Kvm,
    Tcg,
}

/// Everything the agent is configured with.
#[derive(Debug)]
pub struct AgentConfig {
    pub name: String,
    pub machines: PathBuf,
    /// Run directories, overlays and suspended machines.
    pub state: PathBuf,
    pub instance: u32,
    pub toolchain_name: String,
    pub toolchain_version: String,
    pub controllers: Vec<String>,
    pub key: SecretKey,
    pub interactive: InteractiveMode,
    pub accel: AccelChoice,
    /// The program (and leading arguments) qemu runs to relay a guest
    /// connection; the channel address is appended.
    pub relay: Vec<String>,
    pub idle_sleep: (Duration, Duration),
    pub bootstrap_timeout: Duration,
    pub startup_timeout: Duration,
    pub startup_retries: u32,
    pub build_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub suspend_on_failure: bool,
    /// Resume task VMs from a guest state saved once after boot (made on
    /// first use per machine, toolchain and accelerator) instead of booting.
    pub warm_start: bool,
    pub fake_bootstrap: bool,
    pub fake_build: bool,
    pub fake_machine: Option<MachineManifest>,
    pub fake_request: Option<TaskResponse>,
    pub dump_machines: bool,
    pub dump_task: bool,
    pub dump_result: bool,
}

impl AgentConfig {
    pub fn toolchain_id(&self) -> String {
        format!("{}-{}", self.toolchain_name, self.toolchain_version)
    }

    fn instance_dir(&self) -> PathBuf {
        self.state.join(format!("instance-{}", self.instance))
    }
}

/// A machine this agent holds for the current round.
#[derive(Debug)]
struct Offered {
    machine: Machine,
    // Held, not read: dropping it releases the machine.
    _lock: Option<MachineLock>,
}

/// The running agent.
#[derive(Debug)]
pub struct Agent<'a> {
    config: AgentConfig,
    stop: &'a AtomicBool,
    accel: Option<Accel>,
    client: ControllerClient,
}

/// A booted guest's saved state and the frozen disk it goes with.
#[derive(Debug, Clone)]
struct Warm {
    disk: PathBuf,
    state: PathBuf,
}

/// Why a VM run ended.
enum VmEnd {
    Done(ResultManifest),
    Stopped,
}

impl<'a> Agent<'a> {
    pub fn new(config: AgentConfig, stop: &'a AtomicBool) -> Agent<'a> {
        let accel = match config.accel {
            AccelChoice::Kvm => Some(Accel::Kvm),
            AccelChoice::Tcg => Some(Accel::Tcg),
            AccelChoice::Auto => None,
        };
        Agent {
            config,
            stop,
            accel,
            client: ControllerClient::new(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Removes what a killed predecessor of this instance left: VMs still
    /// running, overlays, run directories and unheld lock files.
    pub fn clean_stale(&self) -> Result<(), AgentError> {
        let dir = self.config.instance_dir();
        if dir.exists() {
            kill_recorded_qemu(&dir.join("run"));
            kill_recorded_qemu(&dir.join("warm-run"));
            std::fs::remove_dir_all(&dir).map_err(io_err("remove stale", &dir))?;
            tracing::info!(dir = %dir.display(), "removed what a previous run of this instance left");
        }
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        if self.config.fake_machine.is_none()
            && let Ok(machines) = enumerate(&self.config.machines)
        {
            for m in machines {
                let path = m.lock_path(&self.config.toolchain_name);
                if path.exists()
                    && let Ok(Some(lock)) = MachineLock::try_acquire(&path)
                {
                    // Nobody holds it: a leftover. Removing it while held is safe
                    // because lockers re-check the inode.
                    let _ = std::fs::remove_file(lock.path());
                }
            }
        }
        Ok(())
    }

    fn resolve_accel(&mut self, machine: &Machine) -> Accel {
        if let Some(accel) = self.accel {
            return accel;
        }
        let kernel = machine.revision_path(&machine.manifest.kernel);
        let accel = if probe_kvm(&kernel, Duration::from_secs(8)) {
            tracing::info!("KVM works: guests run accelerated");
            Accel::Kvm
        } else {
            tracing::warn!(
                "KVM does not work on this host (no /dev/kvm access, or a probe VM did not boot with it): \
                 falling back to TCG, which is many times slower"
            );
            Accel::Tcg
        };
        self.accel = Some(accel);
        accel
    }

    /// Runs until stopped (or, with a fake request or a dump mode, once).
    pub fn run(&mut self) -> Result<(), AgentError> {
        self.clean_stale()?;
        while !self.stopping() {
            let mut offered = self.prepare_machines()?;
            if self.config.dump_machines {
                for o in &offered {
                    println!(
                        "{}",
                        serde_json::to_string(&o.machine.manifest.header()).expect("serialises")
                    );
                }
                return Ok(());
            }
            let Some((controller, response)) = self.poll(&offered)? else {
                drop(offered);
                if self.config.fake_request.is_some() {
                    return Ok(());
                }
                self.idle_sleep();
                continue;
            };
            let task = response.task.clone().expect("checked by poll");
            if self.config.dump_task {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&response).expect("serialises")
                );
                return Ok(());
            }
            // Keep only the chosen machine's lock.
            let index = offered
                .iter()
                .position(|o| o.machine.name() == task.machine)
                .expect("checked by poll");
            let chosen = offered.swap_remove(index);
            drop(offered);
            tracing::info!(
                session = %response.session, machine = %task.machine, controller = %controller,
                derivations = task.derivations.len(), "task received"
            );
            let result = self.run_task(&chosen.machine, &task)?;
            drop(chosen);
            let Some(result) = result else {
                break; // stopped
            };
            tracing::info!(session = %response.session, status = result.status.as_str(), message = %result.message, "task done");
            self.report(&response, result)?;
            if self.config.fake_request.is_some() || self.config.dump_result {
                return Ok(());
            }
        }
        tracing::info!("stopping");
        let dir = self.config.instance_dir();
        let _ = std::fs::remove_dir_all(dir.join("run"));
        Ok(())
    }

    fn idle_sleep(&self) {
        let (min, max) = self.config.idle_sleep;
        let pause = if max > min {
            rand::thread_rng().gen_range(min..=max)
        } else {
            min
        };
        tracing::debug!(seconds = pause.as_secs_f64(), "no work; sleeping");
        let until = Instant::now() + pause;
        while Instant::now() < until && !self.stopping() {
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
    }

    /// Locks the free machines, bootstrapping those that need it.
    fn prepare_machines(&mut self) -> Result<Vec<Offered>, AgentError> {
        if let Some(fake) = &self.config.fake_machine {
            return Ok(vec![Offered {
                machine: Machine {
                    volume: "fake".into(),
                    dir: PathBuf::from("/nonexistent"),
                    revision_dir: PathBuf::from("/nonexistent"),
                    manifest: fake.clone(),
                },
                _lock: None,
            }]);
        }
        let tc = self.config.toolchain_name.clone();
        let tc_id = self.config.toolchain_id();
        let mut offered = Vec::new();
        for machine in enumerate(&self.config.machines)? {
            if machine.suspended_path(&tc).exists() {
                tracing::debug!(
                    machine = machine.name(),
                    "suspended for inspection; not offered"
                );
                continue;
            }
            let Some(lock) = MachineLock::try_acquire(&machine.lock_path(&tc))? else {
                continue;
            };
            match bootstrap_state(&machine, &tc, &tc_id, AGENT_VERSION) {
                BootstrapState::Current => {}
                BootstrapState::NewerAgent(version) => {
                    tracing::warn!(
                        machine = machine.name(),
                        "bootstrapped by a newer agent ({version} > {AGENT_VERSION}); leaving it to that agent"
                    );
                    continue;
                }
                BootstrapState::Needed(why) => {
                    tracing::info!(machine = machine.name(), reason = %why, "bootstrapping");
                    let started = Instant::now();
                    match self.bootstrap(&machine) {
                        Ok(true) => tracing::info!(
                            machine = machine.name(),
                            seconds = started.elapsed().as_secs_f64(),
                            "bootstrapped"
                        ),
                        Ok(false) => return Ok(Vec::new()),
                        Err(e) => {
                            tracing::warn!(
                                machine = machine.name(),
                                "bootstrap failed, machine skipped: {e}"
                            );
                            continue;
                        }
                    }
                }
            }
            offered.push(Offered {
                machine,
                _lock: Some(lock),
            });
        }
        Ok(offered)
    }

    /// Boots the machine's current revision once so the guest prepares its
    /// disk, and keeps the result as `<name>-<toolchain>/`. `Ok(false)` when stopped.
    fn bootstrap(&mut self, machine: &Machine) -> Result<bool, AgentError> {
        let tc = &self.config.toolchain_name;
        let final_dir = machine.bootstrapped_dir(tc);
        let new_dir = final_dir.with_extension("new");
        let _ = std::fs::remove_dir_all(&new_dir);
        std::fs::create_dir_all(&new_dir).map_err(io_err("create", &new_dir))?;
        let disk = new_dir.join("disk.qcow2");
        create_overlay(&machine.revision_path(&machine.manifest.disk), &disk)?;
        if !self.config.fake_bootstrap {
            let timeout = self.config.bootstrap_timeout;
            match self.run_vm(
                machine,
                &disk,
                None,
                GuestTask::Bootstrap,
                None,
                timeout,
                timeout,
                false,
            )? {
                VmEnd::Stopped => {
                    let _ = std::fs::remove_dir_all(&new_dir);
                    return Ok(false);
                }
                VmEnd::Done(result) if result.status != ResultStatus::Success => {
                    let _ = std::fs::remove_dir_all(&new_dir);
                    return Err(AgentError::Io {
                        action: "bootstrap",
                        path: final_dir,
                        source: std::io::Error::other(format!(
                            "{}: {}",
                            result.status.as_str(),
                            result.message
                        )),
                    });
                }
                VmEnd::Done(_) => {}
            }
        }
        write_toml(
            &new_dir.join("bootstrapped.toml"),
            &BootstrappedManifest {
                machine_id: machine.manifest.id.clone(),
                toolchain_id: self.config.toolchain_id(),
                agent_version: AGENT_VERSION.to_owned(),
            },
        )?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&new_dir, &final_dir).map_err(io_err("rename", &new_dir))?;
        Ok(true)
    }

    /// Asks each controller in turn; the first acceptable task wins.
    fn poll(&self, offered: &[Offered]) -> Result<Option<(String, TaskResponse)>, AgentError> {
        let names: Vec<String> = offered
            .iter()
            .map(|o| o.machine.name().to_owned())
            .collect();
        if let Some(response) = &self.config.fake_request {
            if !response.has_task() {
                return Ok(None);
            }
            return match check_task(response, &names) {
                Ok(()) => Ok(Some(("(fake request)".into(), response.clone()))),
                Err(refusal) => {
                    tracing::warn!("refusing the fake request's task: {refusal}");
                    Ok(None)
                }
            };
        }
        if offered.is_empty() {
            tracing::debug!("no free machines; not asking for work");
            return Ok(None);
        }
        let request = TaskRequest {
            agent: self.config.name.clone(),
            toolchain_name: self.config.toolchain_name.clone(),
            toolchain_version: self.config.toolchain_version.clone(),
            instance: self.config.instance,
            interactive: self.config.interactive,
            fingerprint: key_fingerprint(&self.config.key.to_public()),
            machines: offered
                .iter()
                .map(|o| o.machine.manifest.header())
                .collect::<Vec<MachineHeader>>(),
        };
        for url in &self.config.controllers {
            if self.stopping() {
                return Ok(None);
            }
            match self.client.request_task(url, &request) {
                Err(e) => tracing::warn!("{e}; skipping it"),
                Ok(response) if !response.has_task() => {
                    tracing::debug!(controller = %url, "no work");
                }
                Ok(response) => match check_task(&response, &names) {
                    Ok(()) => return Ok(Some((url.clone(), response))),
                    Err(refusal) => {
                        tracing::warn!(controller = %url, session = %response.session, "refusing {refusal}")
                    }
                },
            }
        }
        Ok(None)
    }

    /// Runs one task; `None` when the agent was stopped meanwhile.
    fn run_task(
        &mut self,
        machine: &Machine,
        task: &Task,
    ) -> Result<Option<ResultManifest>, AgentError> {
        if self.config.fake_build {
            return Ok(Some(ResultManifest::failed(
                ResultStatus::Abort,
                "fake build (--fake-build): nothing was built",
            )));
        }
        if self.config.fake_machine.is_some() {
            return Err(AgentError::FakeMachine(machine.name().to_owned()));
        }
        let run = self.config.instance_dir().join("run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).map_err(io_err("create", &run))?;
        let inputs = run.join("inputs.export");
        let fetch_started = Instant::now();
        if let Err(e) = self.client.download(&task.inputs_url, &inputs) {
            return Ok(Some(ResultManifest::failed(
                ResultStatus::Abort,
                format!("cannot fetch the task's inputs: {e}"),
            )));
        }
        let inputs_seconds = fetch_started.elapsed().as_secs_f64();
        let bootstrapped = machine
            .bootstrapped_dir(&self.config.toolchain_name)
            .join("disk.qcow2");
        let guest_task = GuestTask::Build {
            derivations: task.derivations.clone(),
            settings: task.settings.clone(),
        };
        let warm = if self.config.warm_start {
            match self.warm_state(machine) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(
                        machine = machine.name(),
                        "cannot save a booted guest's state, booting each task instead: {e}"
                    );
                    None
                }
            }
        } else {
            None
        };
        if self.stopping() {
            return Ok(None);
        }
        let end = self.run_vm(
            machine,
            &bootstrapped,
            warm.as_ref(),
            guest_task,
            Some(inputs),
            self.config.startup_timeout,
            self.config.build_timeout,
            true,
        )?;
        Ok(match end {
            VmEnd::Stopped => None,
            VmEnd::Done(mut result) => {
                result
                    .timings
                    .insert("inputs-download".into(), inputs_seconds);
                Some(result)
            }
        })
    }

    /// Boots `machine` on an overlay of `base` and serves it `task` under
    /// the watchdogs. For builds (`is_task`) the overlay is thrown away; for
    /// a bootstrap `base` itself is booted. A guest that never fetches its
    /// task is retried, then suspended; one that ends without a result is
    /// `abnormal`.
    #[allow(clippy::too_many_arguments)]
    fn run_vm(
        &mut self,
        machine: &Machine,
        base: &Path,
        warm: Option<&Warm>,
        task: GuestTask,
        inputs: Option<PathBuf>,
        startup_timeout: Duration,
        build_timeout: Duration,
        is_task: bool,
    ) -> Result<VmEnd, AgentError> {
        let accel = self.resolve_accel(machine);
        let run = self.config.instance_dir().join("run");
        std::fs::create_dir_all(&run).map_err(io_err("create", &run))?;
        let upload = run.join("upload");
        let attempts = self.config.startup_retries + 1;
        for attempt in 1..=attempts {
            // A retry boots: a saved state that failed once is not trusted.
            let warm = warm.filter(|_| attempt == 1 && is_task);
            let disk = if is_task {
                let overlay = run.join("overlay.qcow2");
                let _ = std::fs::remove_file(&overlay);
                create_overlay(warm.map_or(base, |w| &w.disk), &overlay)?;
                overlay
            } else {
                base.to_owned()
            };
            let channel = Channel::serve(task.clone(), inputs.clone(), &upload)?;
            let mut relay = self.config.relay.clone();
            relay.push(channel.addr.to_string());
            let spec = VmSpec {
                accel,
                disk: disk.clone(),
                run_dir: run.clone(),
                relay,
                append: String::new(),
                cache_unsafe: is_task,
                incoming: warm.map(|w| w.state.clone()),
            };
            if is_task {
                tracing::info!(overlay = %disk.display(), base = %base.display(), "task overlay created");
            }
            let mut vm = Vm::start(machine, &spec)?;
            if warm.is_some()
                && let Err(e) = vm.resume_incoming(startup_timeout)
            {
                // The retry boots instead; the startup watchdog below says so.
                tracing::warn!(
                    machine = machine.name(),
                    "resuming the saved guest failed: {e}"
                );
                vm.force_down();
            }
            // Startup watchdog: the guest must fetch its task in time.
            let fetched = loop {
                if self.stopping() {
                    vm.force_down();
                    if is_task {
                        let _ = std::fs::remove_file(&disk);
                    }
                    return Ok(VmEnd::Stopped);
                }
                if let Some(at) = channel.task_fetched() {
                    break Some(at);
                }
                if vm.exited().is_some() || vm.started.elapsed() > startup_timeout {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let Some(fetched_at) = fetched else {
                let died = vm.exited();
                if attempt < attempts {
                    tracing::warn!(
                        machine = machine.name(),
                        "guest did not fetch its task within {:?} (attempt {attempt} of {attempts}{}); retrying",
                        startup_timeout,
                        died.map(|s| format!(", qemu ended: {s}"))
                            .unwrap_or_default()
                    );
                    vm.force_down();
                    keep_serial_log(&vm, attempt);
                    continue;
                }
                let message = format!(
                    "guest did not fetch its task within {startup_timeout:?} in {attempts} attempts"
                );
                return Ok(VmEnd::Done(
                    self.give_up(machine, vm, &disk, is_task, message),
                ));
            };
            // Build watchdog.
            let result = loop {
                if self.stopping() {
                    vm.force_down();
                    if is_task {
                        let _ = std::fs::remove_file(&disk);
                    }
                    return Ok(VmEnd::Stopped);
                }
                if let Some(result) = channel.result() {
                    break Some(result);
                }
                if vm.exited().is_some() || fetched_at.elapsed() > build_timeout {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let Some((result_at, mut result)) = result else {
                let message = match vm.exited() {
                    Some(status) => format!(
                        "guest ended ({status}) without a result; serial log tail:\n{}",
                        serial_tail(&vm.serial_log)
                    ),
                    None => format!("build did not finish within {build_timeout:?}"),
                };
                return Ok(VmEnd::Done(
                    self.give_up(machine, vm, &disk, is_task, message),
                ));
            };
            // A task's overlay is thrown away: once the result is in, nothing
            // in the guest is worth a clean shutdown. A bootstrap's disk is
            // kept, so the guest syncs and powers itself off, watched.
            if is_task {
                vm.kill();
            } else if !vm.wait_exit(self.config.shutdown_timeout) {
                tracing::warn!(
                    machine = machine.name(),
                    "guest did not power off within {:?}; powering it down",
                    self.config.shutdown_timeout
                );
                let _ = vm.powerdown();
                if !vm.wait_exit(Duration::from_secs(2)) {
                    vm.force_down();
                }
            }
            let ended = Instant::now();
            if is_task {
                let _ = std::fs::remove_file(&disk);
            }
            let t = &mut result.timings;
            t.insert("boot".into(), (fetched_at - vm.started).as_secs_f64());
            t.insert("result".into(), (result_at - fetched_at).as_secs_f64());
            t.insert("shutdown".into(), (ended - result_at).as_secs_f64());
            t.insert("vm-total".into(), (ended - vm.started).as_secs_f64());
            t.insert(format!("accel-{}", accel.as_str()), 1.0);
            if warm.is_some() {
                t.insert("warm-start".into(), 1.0);
            }
            return Ok(VmEnd::Done(result));
        }
        unreachable!("the last attempt always returns")
    }

    /// The saved state of a booted guest of `machine` waiting for its task,
    /// with the disk it belongs to; made once (by booting the bootstrapped
    /// disk on an overlay that is then kept frozen) and reused by every
    /// task. `None` when the agent was stopped meanwhile.
    fn warm_state(&mut self, machine: &Machine) -> Result<Option<Warm>, AgentError> {
        let accel = self.resolve_accel(machine);
        let dir = machine.bootstrapped_dir(&self.config.toolchain_name);
        let warm = Warm {
            disk: dir.join(format!("warm-{}.qcow2", accel.as_str())),
            state: dir.join(format!("warm-{}.state", accel.as_str())),
        };
        if warm.disk.exists() && warm.state.exists() {
            return Ok(Some(warm));
        }
        let started = Instant::now();
        let _ = std::fs::remove_file(&warm.state);
        let _ = std::fs::remove_file(&warm.disk);
        create_overlay(&dir.join("disk.qcow2"), &warm.disk)?;
        let run = self.config.instance_dir().join("warm-run");
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run).map_err(io_err("create", &run))?;
        let channel = Channel::serve(GuestTask::Wait, None, &run.join("upload"))?;
        let mut relay = self.config.relay.clone();
        relay.push(channel.addr.to_string());
        let spec = VmSpec {
            accel,
            disk: warm.disk.clone(),
            run_dir: run.clone(),
            relay,
            append: String::new(),
            cache_unsafe: false,
            incoming: None,
        };
        let mut vm = Vm::start(machine, &spec)?;
        let timeout = self.config.bootstrap_timeout;
        let failed = |vm: &mut Vm, what: String| {
            vm.force_down();
            let _ = std::fs::remove_file(&warm.disk);
            let _ = std::fs::remove_file(&warm.state);
            AgentError::Io {
                action: "save a booted guest",
                path: warm.state.clone(),
                source: std::io::Error::other(format!(
                    "{what}; serial log tail:\n{}",
                    serial_tail(&vm.serial_log)
                )),
            }
        };
        // Two answered polls: the guest is in its wait loop, between polls.
        loop {
            if self.stopping() {
                let _ = failed(&mut vm, "stopped".into());
                return Ok(None);
            }
            if let (n, Some(last)) = channel.task_requests()
                && n >= 2
                && last.elapsed() > Duration::from_millis(15)
            {
                break;
            }
            if vm.exited().is_some() || vm.started.elapsed() > timeout {
                return Err(failed(
                    &mut vm,
                    format!("the guest did not start polling within {timeout:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let partial = warm.state.with_extension("state.partial");
        if let Err(e) = vm.save_state(&partial, timeout) {
            let _ = std::fs::remove_file(&partial);
            return Err(failed(&mut vm, e.to_string()));
        }
        // `quit` closes the disk cleanly: the overlay is complete on disk.
        vm.force_down();
        std::fs::rename(&partial, &warm.state).map_err(io_err("rename", &partial))?;
        let _ = std::fs::remove_dir_all(&run);
        tracing::info!(
            machine = machine.name(),
            seconds = started.elapsed().as_secs_f64(),
            bytes = std::fs::metadata(&warm.state).map_or(0, |m| m.len()),
            "saved a booted guest's state; tasks resume it instead of booting"
        );
        Ok(Some(warm))
    }

    /// Ends a misbehaving VM: suspended for inspection (paused, kept with its
    /// overlay and logs, and reported) unless configured otherwise.
    fn give_up(
        &self,
        machine: &Machine,
        mut vm: Vm,
        disk: &Path,
        is_task: bool,
        message: String,
    ) -> ResultManifest {
        let alive = vm.exited().is_none();
        if self.config.suspend_on_failure && alive && is_task {
            let _ = vm.suspend();
            let stamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let kept = self
                .config
                .state
                .join("suspended")
                .join(format!("{}-{stamp}", machine.name()));
            let run = disk.parent().expect("overlay in run dir").to_owned();
            let _ = std::fs::create_dir_all(kept.parent().expect("has parent"));
            let moved = std::fs::rename(&run, &kept).is_ok();
            let dir = if moved { kept } else { run };
            let pid = vm.detach();
            let report = format!(
                "reason = {message:?}\npid = {pid}\ndir = {:?}\nqmp = {:?}\nserial_log = {:?}\noverlay = {:?}\n",
                dir.display().to_string(),
                dir.join("qmp.sock").display().to_string(),
                dir.join("serial.log").display().to_string(),
                dir.join("overlay.qcow2").display().to_string(),
            );
            let marker = machine.suspended_path(&self.config.toolchain_name);
            let _ = std::fs::write(&marker, report);
            tracing::error!(
                machine = machine.name(),
                "{message}; machine suspended for inspection (qemu pid {pid}, files in {}); \
                 remove {} to use the machine again",
                dir.display(),
                marker.display()
            );
            return ResultManifest::failed(
                ResultStatus::Abnormal,
                format!("{message}; machine suspended for inspection"),
            );
        }
        vm.force_down();
        if is_task {
            let _ = std::fs::remove_file(disk);
        }
        tracing::error!(machine = machine.name(), "{message}");
        ResultManifest::failed(ResultStatus::Abnormal, message)
    }

    /// Uploads the outputs and logs, then posts the signed result (or prints
    /// it with `--dump-result`).
    fn report(&self, response: &TaskResponse, result: ResultManifest) -> Result<(), AgentError> {
        let request = ResultRequest {
            session: response.session.clone(),
            challenge_signature: sign_challenge(
                &self.config.key,
                &response.session,
                &response.challenge,
            ),
            agent: self.config.name.clone(),
            result,
        };
        let upload = self.config.instance_dir().join("run/upload");
        if self.config.dump_result {
            println!(
                "{}",
                serde_json::to_string_pretty(&request).expect("serialises")
            );
        } else {
            let sent = (|| -> Result<(), ControllerError> {
                for kind in ["nar", "log"] {
                    let Ok(entries) = std::fs::read_dir(upload.join(kind)) else {
                        continue;
                    };
                    for entry in entries.flatten() {
                        let name = entry.file_name().to_string_lossy().into_owned();
                        self.client
                            .upload(&response.result_url, kind, &name, &entry.path())?;
                    }
                }
                self.client.post_result(&response.result_url, &request)
            })();
            if let Err(e) = sent {
                tracing::error!(session = %response.session, "result not delivered: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(self.config.instance_dir().join("run"));
        Ok(())
    }
}

fn keep_serial_log(vm: &Vm, attempt: u32) {
    let _ = std::fs::rename(
        &vm.serial_log,
        vm.serial_log
            .with_extension(format!("attempt-{attempt}.log")),
    );
}

fn serial_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Kills a qemu whose pid file is in `run`, if that pid is still a qemu
/// started for this run directory (a pid may have been reused since).
fn kill_recorded_qemu(run: &Path) {
    let Ok(text) = std::fs::read_to_string(run.join("qemu.pid")) else {
        return;
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    if cmdline.contains("qemu") && cmdline.contains(&*run.to_string_lossy()) {
        // SAFETY: plain kill(2) on a pid we checked.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        tracing::info!(pid, "killed a VM left running by a previous run");
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
