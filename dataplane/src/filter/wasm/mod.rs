//! Custom plugins: WebAssembly modules speaking the proxy-wasm ABI (the HTTP filter subset),
//! run sandboxed in wasmtime.
//!
//! Data flow:
//!
//! - [`Plugins`] owns the one wasmtime `Engine` of the proxy. It finds the module file a
//!   route's plugin names in `--plugins-dir` (`<name>.wasm`, or `<name>_<version>.wasm`),
//!   compiles it once per content hash and classifies what is wrong with it ([`module`]: 03
//!   not found or not WebAssembly, 04 a required export missing, 05 the wrong ABI), always off
//!   the request path (`spawn_blocking`). It polls the directory, so a file that appears,
//!   changes or goes away is picked up without a restart.
//! - A route's plugin is a [`Slot`]: one module file with one configuration. Its state is
//!   either a running `vm::Plugin` (a few VMs, one per worker, each started with
//!   `proxy_on_vm_start` and `proxy_on_configure`) or the [`LoadError`] that requests get.
//!   When the file changes the slot's state is swapped; routes keep pointing at the slot.
//! - Per request, [`Exchange`] opens an HTTP context in one VM per plugin and runs the
//!   phases: request headers, request body (read-ahead bodies only), response headers and
//!   response body (bodies of a known size up to `--plugin-response-buffer-bytes`). A plugin
//!   continues, changes headers or bodies, or answers locally. A trap, an exhausted fuel or
//!   time budget or the memory limit answers 11 and discards that VM ([`RunError`]).
//! - [`problems`] turns the slots that do not load into the problems an Ack carries, so the
//!   controller shows them as `Programmed=False` on the ApiProxy.

mod abi;
mod exchange;
pub mod module;
mod runtime;
pub mod testkit;
mod vm;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use kanali_proto::v1 as pb;

use crate::errors::ErrorCode;

pub use exchange::{Exchange, RequestProps};
pub use runtime::{Plugins, WasmError};

/// Plugin runtime settings.
#[derive(Clone, Debug)]
pub struct WasmConfig {
    /// Where module files are; `None`: every custom plugin answers 03.
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changed files.
    pub poll_interval: Duration,
    /// WebAssembly instructions (fuel) one plugin may execute for one request, all its
    /// callbacks together; also the budget of starting a VM.
    pub fuel_per_request: u64,
    /// Longest a single callback may run (wall clock; enforced by epoch interruption).
    pub call_timeout: Duration,
    /// Largest linear memory a plugin VM may have, in bytes.
    pub memory_limit: usize,
    /// Responses with a known length up to this are buffered for `proxy_on_response_body`;
    /// longer or unsized ones stream without it.
    pub response_buffer_bytes: usize,
    /// VMs per plugin (one per worker thread, so that requests on different workers do not
    /// wait for each other).
    pub vms_per_plugin: usize,
}

impl Default for WasmConfig {
    fn default() -> Self {
        WasmConfig {
            dir: None,
            poll_interval: Duration::from_secs(1),
            fuel_per_request: 20_000_000,
            call_timeout: Duration::from_millis(100),
            memory_limit: 32 * 1024 * 1024,
            response_buffer_bytes: 64 * 1024,
            vms_per_plugin: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Why a plugin does not run at all: the route answers [`LoadError::code`] until it is fixed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The proxy has no `--plugins-dir`.
    #[error("this proxy has no plugins directory (--plugins-dir)")]
    NoPluginsDir,
    /// No such file.
    #[error("module file {0} does not exist")]
    NotFound(String),
    /// The file cannot be read or is not a WebAssembly module.
    #[error("{file} is not a valid WebAssembly module: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// What the reader or the compiler said.
        reason: String,
    },
    /// A required export is missing.
    #[error("{file} does not export {missing}")]
    MissingExport {
        /// The file.
        file: String,
        /// Which ones.
        missing: String,
    },
    /// The module speaks another ABI, or exports or imports functions with other signatures.
    #[error("{file} does not implement the proxy-wasm ABI 0.2.x: {reason}")]
    AbiMismatch {
        /// The file.
        file: String,
        /// What does not match.
        reason: String,
    },
    /// `proxy_on_vm_start` or `proxy_on_configure` returned false.
    #[error("{file} rejected its configuration ({callback} returned false)")]
    ConfigRejected {
        /// The file.
        file: String,
        /// Which callback.
        callback: &'static str,
    },
    /// Instantiating or starting the module failed at run time (a trap, the budget, the
    /// memory limit).
    #[error("{file} failed while starting: {reason}")]
    StartFailed {
        /// The file.
        file: String,
        /// Why.
        reason: String,
    },
}

impl LoadError {
    /// The Kanali error the plugin's routes answer.
    pub fn code(&self) -> ErrorCode {
        match self {
            LoadError::NoPluginsDir
            | LoadError::NotFound(_)
            | LoadError::Invalid { .. }
            | LoadError::ConfigRejected { .. } => ErrorCode::PluginOpen,
            LoadError::MissingExport { .. } => ErrorCode::PluginSymbol,
            LoadError::AbiMismatch { .. } => ErrorCode::PluginInterface,
            LoadError::StartFailed { .. } => ErrorCode::PluginRuntime,
        }
    }

    /// The reason shown on the ApiProxy's `Programmed` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            LoadError::NoPluginsDir | LoadError::NotFound(_) => "PluginNotFound",
            LoadError::Invalid { .. } => "PluginInvalid",
            LoadError::MissingExport { .. } => "PluginMissingExport",
            LoadError::AbiMismatch { .. } => "PluginAbiMismatch",
            LoadError::ConfigRejected { .. } => "PluginConfigRejected",
            LoadError::StartFailed { .. } => "PluginStartFailed",
        }
    }
}

/// Why a plugin failed while handling a request (the client gets error 11).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunError {
    /// The module trapped (`unreachable`, an out-of-bounds access, a panic in the plugin).
    #[error("trapped: {0}")]
    Trap(String),
    /// It used up the request's fuel.
    #[error("used up its budget of {0} instructions")]
    OutOfFuel(u64),
    /// A callback ran past the time limit.
    #[error("a callback ran longer than {0:?}")]
    Timeout(Duration),
    /// It tried to grow its memory past the limit.
    #[error("tried to grow its memory past the limit of {0} bytes")]
    Memory(usize),
    /// Its VM was discarded (another request on it trapped) while this request was in flight.
    #[error("its VM was discarded while the request was in flight")]
    Discarded,
    /// A new VM (replacing a discarded one) did not start.
    #[error("a new VM did not start: {0}")]
    Start(String),
}

/// The state of a slot: running, or why not.
#[derive(Debug)]
pub(crate) enum SlotState {
    /// Loaded and started.
    Ready(Arc<vm::Plugin>),
    /// Not runnable.
    Failed(LoadError),
}

/// One module file with one configuration, shared by every route (and table) that runs the
/// same plugin with the same configuration. Its state changes when the file does.
#[derive(Debug)]
pub struct Slot {
    /// The plugin's name, as the ApiProxy gives it.
    name: Arc<str>,
    /// `<name>.wasm` or `<name>_<version>.wasm`.
    file: String,
    /// The configuration handed to `proxy_on_configure`.
    config: Arc<[u8]>,
    state: ArcSwap<SlotState>,
}

impl Slot {
    fn new(name: &str, file: String, config: &str, state: SlotState) -> Slot {
        Slot {
            name: Arc::from(name),
            file,
            config: Arc::from(config.as_bytes()),
            state: ArcSwap::from_pointee(state),
        }
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Why it does not run, if it does not.
    pub fn load_error(&self) -> Option<LoadError> {
        match &**self.state.load() {
            SlotState::Ready(_) => None,
            SlotState::Failed(e) => Some(e.clone()),
        }
    }

    /// A copy of this slot with one VM of its own, started now. Running every request in
    /// such a copy is what an instance per request costs: the benchmark that chose VMs per
    /// worker measures it. `None` when the plugin does not load.
    #[doc(hidden)]
    pub fn fresh_copy(&self) -> Option<Arc<Slot>> {
        let SlotState::Ready(plugin) = &**self.state.load() else {
            return None;
        };
        let plugin = plugin.single_vm_copy().ok()?;
        Some(Arc::new(Slot::new(
            &self.name,
            self.file.clone(),
            "",
            SlotState::Ready(Arc::new(plugin)),
        )))
    }
}

/// The module file name of a plugin: `<name>.wasm`, or `<name>_<version>.wasm`. The
/// controller only lets file-name-safe names and versions through; this checks again, since
/// the proxy must never open a file outside its plugins directory.
pub fn file_name(name: &str, version: &str) -> Option<String> {
    let safe = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && !s.contains("..")
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    if !safe(name) || !(version.is_empty() || safe(version)) {
        return None;
    }
    Some(if version.is_empty() {
        format!("{name}.wasm")
    } else {
        format!("{name}_{version}.wasm")
    })
}

/// A custom plugin in a route's chain.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    /// The module and configuration it runs.
    pub slot: Arc<Slot>,
}

impl WasmFilter {
    /// A plugin that cannot run on this proxy at all (no plugins directory, an unsafe name):
    /// its routes answer `error`'s code.
    pub fn failed(plugin: &pb::WasmPlugin, error: LoadError) -> WasmFilter {
        let file = file_name(&plugin.name, &plugin.version).unwrap_or_default();
        WasmFilter {
            slot: Arc::new(Slot::new(
                &plugin.name,
                file,
                &plugin.config_json,
                SlotState::Failed(error),
            )),
        }
    }
}

/// A Wasm plugin a route of the table runs: what a problem report names.
#[derive(Debug, Clone)]
pub struct WasmUse {
    /// The ApiProxy the route came from.
    pub source: Option<pb::ResourceRef>,
    /// The plugin.
    pub slot: Arc<Slot>,
}

/// What the proxy reports about the plugins its table runs: one problem per route and
/// plugin that does not load, naming the ApiProxy and the plugin.
pub fn problems(uses: &[WasmUse]) -> Vec<pb::ResourceError> {
    uses.iter()
        .filter_map(|u| {
            let error = u.slot.load_error()?;
            Some(pb::ResourceError {
                resource: u.source.clone(),
                message: format!(
                    "plugin {:?}: {error}; requests get error {:02}",
                    u.slot.name(),
                    error.code().code()
                ),
                reason: error.reason().to_owned(),
            })
        })
        .collect()
}
