//! The plugin runtime of a proxy: one wasmtime `Engine`, the module files of
//! `--plugins-dir` (compiled once per content hash, re-checked when they change) and the
//! slots routes run.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use kanali_proto::v1 as pb;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::abi::{self, HostFunctions};
use super::module::{self, Compiled};
use super::vm::{EPOCH_TICK, Limits, Plugin, PluginInfo};
use super::{LoadError, Slot, SlotState, WasmConfig, file_name};

/// Module files larger than this are refused unread (a plugin is kilobytes to a few MiB).
const MAX_MODULE_BYTES: u64 = 64 * 1024 * 1024;

/// Why the plugin runtime could not be created.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// wasmtime refused the configuration (e.g. an unsupported CPU).
    #[error("cannot start the WebAssembly runtime: {0}")]
    Engine(String),
}

/// What identifies a file's contents without reading them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    dev: u64,
}

impl Stamp {
    /// `None` when there is no such file. Follows symbolic links, so a Kubernetes volume
    /// update (a new target behind the same name) is a change.
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            inode: m.ino(),
            dev: m.dev(),
        })
    }
}

/// One module file as last seen.
struct FileEntry {
    stamp: Option<Stamp>,
    /// Content hash, when it could be read.
    hash: Option<String>,
    result: Result<Arc<Compiled>, LoadError>,
}

/// The files and compiled modules, guarded together (a scan holds them throughout, so
/// scans take turns).
#[derive(Default)]
struct Files {
    by_name: HashMap<String, FileEntry>,
    /// Compiled modules by content hash: two names with the same bytes compile once.
    modules: HashMap<String, Weak<Compiled>>,
}

/// The plugin runtime.
pub struct Plugins {
    host: HostFunctions,
    limits: Arc<Limits>,
    dir: Option<PathBuf>,
    poll_interval: Duration,
    files: Mutex<Files>,
    slots: Mutex<HashMap<(String, String), Weak<Slot>>>,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for Plugins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugins")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data, consistent after every statement: a panic elsewhere does not spoil it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Plugins {
    /// A runtime with `config`'s directory and budgets. With a directory, starts the thread
    /// that ticks the epoch (the clock of the per-callback time limit); it ends with the
    /// runtime.
    pub fn new(config: &WasmConfig) -> Result<Plugins, WasmError> {
        let mut wasm = wasmtime::Config::new();
        wasm.consume_fuel(true).epoch_interruption(true);
        let engine =
            wasmtime::Engine::new(&wasm).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let host = abi::host_functions(&engine).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        // Without a directory no plugin ever runs: no clock to keep.
        if config.dir.is_some() {
            let weak = engine.weak();
            let ticker = std::thread::Builder::new()
                .name("kanali-wasm-epoch".to_owned())
                .spawn(move || {
                    while let Some(engine) = weak.upgrade() {
                        engine.increment_epoch();
                        drop(engine);
                        std::thread::sleep(EPOCH_TICK);
                    }
                });
            if let Err(e) = ticker {
                return Err(WasmError::Engine(format!(
                    "cannot start the epoch thread: {e}"
                )));
            }
        }
        let tick = EPOCH_TICK.as_nanos().max(1);
        let ticks = config.call_timeout.as_nanos().div_ceil(tick) + 1;
        Ok(Plugins {
            host,
            limits: Arc::new(Limits {
                fuel: config.fuel_per_request.max(1),
                timeout: config.call_timeout,
                ticks: u64::try_from(ticks).unwrap_or(u64::MAX),
                memory_limit: config.memory_limit,
                response_buffer: config.response_buffer_bytes,
                vms: config.vms_per_plugin.max(1),
            }),
            dir: config.dir.clone(),
            poll_interval: config.poll_interval,
            files: Mutex::new(Files::default()),
            slots: Mutex::new(HashMap::new()),
            changes: watch::Sender::new(0),
        })
    }

    /// Ticks whenever a plugin a route runs started or stopped loading (a file appeared,
    /// changed or went away): the proxy then reports its problems again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The slot for `plugin`: the one routes already share, or a new one. A new slot's file
    /// is loaded and its VMs started now when [`Plugins::prepare`] did not already.
    pub fn slot(&self, plugin: &pb::WasmPlugin) -> Arc<Slot> {
        self.slot_in(&mut lock(&self.files), plugin)
    }

    /// [`Plugins::slot`] with the files already locked.
    fn slot_in(&self, files: &mut Files, plugin: &pb::WasmPlugin) -> Arc<Slot> {
        let Some(file) = file_name(&plugin.name, &plugin.version) else {
            return Arc::new(Slot::new(
                &plugin.name,
                String::new(),
                &plugin.config_json,
                SlotState::Failed(LoadError::NotFound(format!(
                    "{:?} version {:?} (not a file name)",
                    plugin.name, plugin.version
                ))),
            ));
        };
        let key = (file.clone(), plugin.config_json.clone());
        if let Some(slot) = lock(&self.slots).get(&key).and_then(Weak::upgrade) {
            return slot;
        }
        if !files.by_name.contains_key(&file) {
            let entry = self.load(&mut files.modules, &file);
            files.by_name.insert(file.clone(), entry);
        }
        let slot = Slot::new(
            &plugin.name,
            file,
            &plugin.config_json,
            SlotState::Failed(LoadError::NoPluginsDir),
        );
        slot.state.store(Arc::new(self.state_of(files, &slot)));
        let slot = Arc::new(slot);
        lock(&self.slots).insert(key, Arc::downgrade(&slot));
        slot
    }

    /// Loads the module files `plugins` name and starts the slots they need, so building a
    /// routing table runs no plugin code per route. The slots are returned to keep them alive
    /// until the table holds them. Blocks on file I/O and compiling: call it from a blocking
    /// thread, as the snapshot's apply is.
    pub fn prepare<'a>(&self, plugins: impl Iterator<Item = &'a pb::Plugin>) -> Vec<Arc<Slot>> {
        let plugins: Vec<&pb::WasmPlugin> = plugins
            .filter_map(|p| match &p.kind {
                Some(pb::plugin::Kind::Wasm(w)) => Some(w),
                _ => None,
            })
            .collect();
        if plugins.is_empty() {
            return Vec::new();
        }
        let files: BTreeSet<String> = plugins
            .iter()
            .filter_map(|p| file_name(&p.name, &p.version))
            .collect();
        // One hold of the lock for both: a directory poll in between would drop the entries no
        // slot holds yet, and every module would compile twice.
        let mut locked = lock(&self.files);
        self.scan_in(&mut locked, &files);
        plugins
            .iter()
            .map(|p| self.slot_in(&mut locked, p))
            .collect()
    }

    /// Polls the plugins directory until `shutdown` turns true: a file a route runs that
    /// appeared, changed or went away is loaded again, and its slots follow.
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        if self.dir.is_none() {
            return;
        }
        let mut ticker = tokio::time::interval(self.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = crate::stopped(&mut shutdown) => return,
            }
            // File I/O and compiling block: off the runtime's threads.
            let this = self.clone();
            let _ = tokio::task::spawn_blocking(move || this.scan(&BTreeSet::new())).await;
        }
    }

    /// Checks the files of every live slot, and `also`; loads those that changed and
    /// restarts their slots. Blocking.
    pub(crate) fn scan(&self, also: &BTreeSet<String>) {
        self.scan_in(&mut lock(&self.files), also);
    }

    /// [`Plugins::scan`] with the files already locked.
    fn scan_in(&self, files: &mut Files, also: &BTreeSet<String>) {
        let live: Vec<Arc<Slot>> = {
            let mut slots = lock(&self.slots);
            slots.retain(|_, s| s.strong_count() > 0);
            slots.values().filter_map(Weak::upgrade).collect()
        };
        let wanted: BTreeSet<String> = live
            .iter()
            .map(|s| s.file.clone())
            .chain(also.iter().cloned())
            .collect();
        let mut changed = HashSet::new();
        for file in &wanted {
            let stamp = self.dir.as_deref().and_then(|d| Stamp::of(&d.join(file)));
            if let Some(entry) = files.by_name.get(file)
                && entry.stamp == stamp
            {
                continue;
            }
            let entry = self.load(&mut files.modules, file);
            let same = files.by_name.get(file).is_some_and(|old| {
                old.hash.is_some()
                    && old.hash == entry.hash
                    && old.result.is_ok() == entry.result.is_ok()
            });
            files.by_name.insert(file.clone(), entry);
            if !same {
                changed.insert(file.clone());
            }
        }
        files.by_name.retain(|f, _| wanted.contains(f));
        files.modules.retain(|_, m| m.strong_count() > 0);
        let mut reloaded = false;
        for slot in live.iter().filter(|s| changed.contains(&s.file)) {
            let state = self.state_of(files, slot);
            match &state {
                SlotState::Ready(_) => {
                    tracing::info!(plugin = %slot.name, file = %slot.file, "plugin module (re)loaded")
                }
                SlotState::Failed(error) => {
                    tracing::warn!(plugin = %slot.name, file = %slot.file, %error, code = error.code().code(), "plugin module does not load; its routes answer an error")
                }
            }
            slot.state.store(Arc::new(state));
            reloaded = true;
        }
        if reloaded {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Reads, hashes and compiles `file`.
    fn load(&self, modules: &mut HashMap<String, Weak<Compiled>>, file: &str) -> FileEntry {
        let failed = |stamp, error| FileEntry {
            stamp,
            hash: None,
            result: Err(error),
        };
        let Some(dir) = &self.dir else {
            return failed(None, LoadError::NoPluginsDir);
        };
        let path = dir.join(file);
        let shown = path.display().to_string();
        let Some(stamp) = Stamp::of(&path) else {
            return failed(None, LoadError::NotFound(shown));
        };
        if stamp.len > MAX_MODULE_BYTES {
            let reason = format!("larger than {MAX_MODULE_BYTES} bytes");
            return failed(
                Some(stamp),
                LoadError::Invalid {
                    file: shown,
                    reason,
                },
            );
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return failed(None, LoadError::NotFound(shown));
            }
            Err(e) => {
                let reason = format!("cannot read it: {e}");
                return failed(
                    Some(stamp),
                    LoadError::Invalid {
                        file: shown,
                        reason,
                    },
                );
            }
        };
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let result = match modules.get(&hash).and_then(Weak::upgrade) {
            Some(compiled) => Ok(compiled),
            None => match module::compile(&self.host, &shown, &bytes, hash.clone()) {
                Ok(compiled) => {
                    let compiled = Arc::new(compiled);
                    modules.insert(hash.clone(), Arc::downgrade(&compiled));
                    tracing::info!(file = %shown, sha256 = %hash, abi = compiled.abi, "compiled plugin module");
                    Ok(compiled)
                }
                Err(error) => Err(error),
            },
        };
        FileEntry {
            stamp: Some(stamp),
            hash: Some(hash),
            result,
        }
    }

    /// What `slot` becomes with its file as loaded: started, or why not.
    fn state_of(&self, files: &Files, slot: &Slot) -> SlotState {
        match files.by_name.get(&slot.file).map(|e| &e.result) {
            Some(Ok(compiled)) => {
                let info = PluginInfo {
                    name: slot.name.clone(),
                    file: files_path(self.dir.as_deref(), &slot.file),
                    config: slot.config.clone(),
                };
                match Plugin::start(info, compiled.clone(), self.limits.clone()) {
                    Ok(plugin) => SlotState::Ready(Arc::new(plugin)),
                    Err(error) => SlotState::Failed(error),
                }
            }
            Some(Err(error)) => SlotState::Failed(error.clone()),
            None if self.dir.is_none() => SlotState::Failed(LoadError::NoPluginsDir),
            None => SlotState::Failed(LoadError::NotFound(files_path(
                self.dir.as_deref(),
                &slot.file,
            ))),
        }
    }
}

fn files_path(dir: Option<&Path>, file: &str) -> String {
    match dir {
        Some(d) => d.join(file).display().to_string(),
        None => file.to_owned(),
    }
}
