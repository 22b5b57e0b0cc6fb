//! Running a plugin: its VMs, started once each, and the HTTP contexts requests open in them
//! ([`Stream`]), under the per-request fuel budget, the per-callback time limit and the
//! memory limit.
//!
//! A plugin has one VM per worker (as Envoy runs one per worker thread): a request opens its
//! HTTP context in the VM of the worker it arrived on and keeps using that VM, whichever
//! thread later polls it; a mutex makes the (short, synchronous) callbacks take turns. So the
//! root context and whatever a plugin keeps in it live as long as the VM, and no request pays
//! for instantiating a module. A VM that fails (a trap, the budget, the memory limit) is
//! discarded: the requests with a context in it get error 11 at their next callback, and
//! the next request on that worker starts a fresh VM.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use wasmtime::{Instance, Store, Trap, TypedFunc};

use super::abi::{Call, Host};
use super::module::Compiled;
use super::{LoadError, RunError};

/// The root context's id; HTTP contexts count up from the next one.
const ROOT_CONTEXT: i32 = 1;

/// How long one epoch tick is: the granularity of the per-callback time limit.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The budgets every VM of the runtime runs under.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// Fuel per request (and for starting a VM).
    pub fuel: u64,
    /// Time per callback.
    pub timeout: Duration,
    /// `timeout` in epoch ticks, rounded up, plus the tick in progress.
    pub ticks: u64,
    /// Largest linear memory.
    pub memory_limit: usize,
    /// Largest response body buffered for the body callback.
    pub response_buffer: usize,
    /// VMs per plugin.
    pub vms: usize,
}

/// The callbacks Kanali calls, looked up once per VM.
struct Callbacks {
    context_create: TypedFunc<(i32, i32), ()>,
    request_headers: TypedFunc<(i32, i32, i32), i32>,
    request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    done: Option<TypedFunc<i32, i32>>,
    log: Option<TypedFunc<i32, ()>>,
    delete: Option<TypedFunc<i32, ()>>,
}

/// One live instance of a plugin.
struct Vm {
    store: Store<Host>,
    callbacks: Callbacks,
    next_context: i32,
}

/// Why a VM did not start.
enum StartError {
    /// A callback said no.
    Rejected(&'static str),
    /// It failed.
    Failed(RunError),
}

/// What a run-time failure was.
fn classify(error: &wasmtime::Error, host: &Host, limits: &Limits) -> RunError {
    if host.limiter.exceeded {
        return RunError::Memory(host.limiter.memory_limit);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => RunError::OutOfFuel(limits.fuel),
        Some(Trap::Interrupt) => RunError::Timeout(limits.timeout),
        Some(trap) => RunError::Trap(trap.to_string()),
        None => RunError::Trap(
            error
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
    }
}

impl Vm {
    /// Instantiates the module and starts it: WASI initialisation, the root context,
    /// `proxy_on_vm_start` and `proxy_on_configure` with the plugin's configuration.
    fn start(plugin: &PluginInfo, compiled: &Compiled, limits: &Limits) -> Result<Vm, StartError> {
        let engine = compiled.pre.module().engine();
        let mut store = Store::new(
            engine,
            Host::new(
                plugin.name.clone(),
                plugin.config.clone(),
                limits.memory_limit,
            ),
        );
        store.limiter(|host| &mut host.limiter);
        let failed = |store: &Store<Host>, e: wasmtime::Error| {
            StartError::Failed(classify(&e, store.data(), limits))
        };
        if let Err(e) = store.set_fuel(limits.fuel) {
            return Err(failed(&store, e));
        }
        store.set_epoch_deadline(limits.ticks);
        let instance = match compiled.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => return Err(failed(&store, e)),
        };
        let callbacks = match Self::callbacks(&instance, &mut store) {
            Some(c) => c,
            // The module's exports were checked when it was compiled.
            None => {
                return Err(StartError::Failed(RunError::Trap(
                    "the module lacks a required export".to_owned(),
                )));
            }
        };
        match Self::init(&instance, &mut store, &callbacks, plugin.config.len()) {
            Ok(None) => Ok(Vm {
                store,
                callbacks,
                next_context: ROOT_CONTEXT + 1,
            }),
            Ok(Some(callback)) => Err(StartError::Rejected(callback)),
            Err(e) => Err(failed(&store, e)),
        }
    }

    fn callbacks(instance: &Instance, store: &mut Store<Host>) -> Option<Callbacks> {
        let memory = instance.get_memory(&mut *store, "memory")?;
        let alloc = instance
            .get_typed_func::<i32, i32>(&mut *store, "proxy_on_memory_allocate")
            .or_else(|_| instance.get_typed_func::<i32, i32>(&mut *store, "malloc"))
            .ok()?;
        let host = store.data_mut();
        host.memory = Some(memory);
        host.alloc = Some(alloc);
        let body = |store: &mut Store<Host>, name| instance.get_typed_func(store, name).ok();
        Some(Callbacks {
            context_create: instance
                .get_typed_func(&mut *store, "proxy_on_context_create")
                .ok()?,
            request_headers: instance
                .get_typed_func(&mut *store, "proxy_on_request_headers")
                .ok()?,
            request_body: body(store, "proxy_on_request_body"),
            response_headers: body(store, "proxy_on_response_headers"),
            response_body: body(store, "proxy_on_response_body"),
            done: instance.get_typed_func(&mut *store, "proxy_on_done").ok(),
            log: instance.get_typed_func(&mut *store, "proxy_on_log").ok(),
            delete: instance.get_typed_func(&mut *store, "proxy_on_delete").ok(),
        })
    }

    /// The start sequence of the spec; `Some(callback)` when a callback returned false.
    fn init(
        instance: &Instance,
        store: &mut Store<Host>,
        callbacks: &Callbacks,
        config_len: usize,
    ) -> wasmtime::Result<Option<&'static str>> {
        if let Ok(init) = instance.get_typed_func::<(), ()>(&mut *store, "_initialize") {
            init.call(&mut *store, ())?;
            if let Ok(main) = instance.get_typed_func::<(i32, i32), i32>(&mut *store, "main") {
                main.call(&mut *store, (0, 0))?;
            }
        } else if let Ok(start) = instance.get_typed_func::<(), ()>(&mut *store, "_start") {
            start.call(&mut *store, ())?;
        }
        callbacks
            .context_create
            .call(&mut *store, (ROOT_CONTEXT, 0))?;
        if let Ok(vm_start) =
            instance.get_typed_func::<(i32, i32), i32>(&mut *store, "proxy_on_vm_start")
            && vm_start.call(&mut *store, (ROOT_CONTEXT, 0))? == 0
        {
            return Ok(Some("proxy_on_vm_start"));
        }
        if let Ok(configure) =
            instance.get_typed_func::<(i32, i32), i32>(&mut *store, "proxy_on_configure")
        {
            let size = i32::try_from(config_len).unwrap_or(i32::MAX);
            if configure.call(&mut *store, (ROOT_CONTEXT, size))? == 0 {
                return Ok(Some("proxy_on_configure"));
            }
        }
        Ok(None)
    }
}

/// What identifies a plugin's VMs: its name (for logs), file and configuration.
#[derive(Clone, Debug)]
pub(crate) struct PluginInfo {
    pub name: Arc<str>,
    pub file: String,
    pub config: Arc<[u8]>,
}

/// A VM slot: the VM, and a generation that changes whenever it is discarded, so contexts
/// opened in a discarded VM are never looked up in its replacement.
struct VmSlot {
    vm: Option<Vm>,
    generation: u64,
}

/// A loaded plugin with one configuration: its VMs.
pub struct Plugin {
    info: PluginInfo,
    compiled: Arc<Compiled>,
    pub(crate) limits: Arc<Limits>,
    vms: Box<[Mutex<VmSlot>]>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.info.name)
            .field("file", &self.info.file)
            .field("module", &self.compiled)
            .finish_non_exhaustive()
    }
}

/// The worker a request arrived on, as a small number: a worker thread's own index (so that
/// with a VM per worker, no two workers share one), else one each thread draws the first time
/// (the threads of a work-stealing runtime).
fn worker_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = crate::workers::index()
            .unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed));
    }
    INDEX.with(|i| *i)
}

fn lock(slot: &Mutex<VmSlot>) -> MutexGuard<'_, VmSlot> {
    match slot.lock() {
        Ok(guard) => guard,
        // A panic while a callback ran: the VM may be half-way through anything.
        Err(poisoned) => {
            let mut guard = poisoned.into_inner();
            guard.vm = None;
            guard.generation += 1;
            slot.clear_poison();
            guard
        }
    }
}

impl Plugin {
    /// Starts every VM of a plugin; the first that does not start says why the plugin does
    /// not load. Runs plugin code: call it off the request path.
    pub(crate) fn start(
        info: PluginInfo,
        compiled: Arc<Compiled>,
        limits: Arc<Limits>,
    ) -> Result<Plugin, LoadError> {
        let mut vms = Vec::with_capacity(limits.vms.max(1));
        for _ in 0..limits.vms.max(1) {
            let vm = Vm::start(&info, &compiled, &limits).map_err(|e| match e {
                StartError::Rejected(callback) => LoadError::ConfigRejected {
                    file: info.file.clone(),
                    callback,
                },
                StartError::Failed(reason) => LoadError::StartFailed {
                    file: info.file.clone(),
                    reason: reason.to_string(),
                },
            })?;
            vms.push(Mutex::new(VmSlot {
                vm: Some(vm),
                generation: 0,
            }));
        }
        Ok(Plugin {
            info,
            compiled,
            limits,
            vms: vms.into_boxed_slice(),
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The compiled module (tests check it is shared).
    #[cfg(test)]
    pub(crate) fn compiled_for_tests(&self) -> Arc<Compiled> {
        self.compiled.clone()
    }

    /// The same plugin with one new VM.
    pub(crate) fn single_vm_copy(&self) -> Result<Plugin, LoadError> {
        let limits = Limits {
            vms: 1,
            ..(*self.limits).clone()
        };
        Plugin::start(self.info.clone(), self.compiled.clone(), Arc::new(limits))
    }

    /// Opens an HTTP context for a request, in the VM of the current worker (starting a new
    /// one if the last one was discarded).
    pub(crate) fn open(self: &Arc<Self>) -> Result<Stream, RunError> {
        let index = worker_index() % self.vms.len();
        let mut slot = lock(&self.vms[index]);
        if slot.vm.is_none() {
            match Vm::start(&self.info, &self.compiled, &self.limits) {
                Ok(vm) => slot.vm = Some(vm),
                Err(StartError::Rejected(callback)) => {
                    return Err(RunError::Start(format!("{callback} returned false")));
                }
                Err(StartError::Failed(e)) => return Err(RunError::Start(e.to_string())),
            }
        }
        let generation = slot.generation;
        let Some(vm) = slot.vm.as_mut() else {
            return Err(RunError::Discarded);
        };
        let context = vm.next_context;
        // Ids are never 0 (none) or the root context's.
        vm.next_context = match vm.next_context.wrapping_add(1) {
            n if n <= ROOT_CONTEXT => ROOT_CONTEXT + 1,
            n => n,
        };
        drop(slot);
        let mut stream = Stream {
            plugin: self.clone(),
            vm: index,
            generation,
            context,
            fuel: self.limits.fuel,
            closed: false,
        };
        stream.call(&mut Call::default(), |callbacks, store, context| {
            callbacks
                .context_create
                .call(store, (context, ROOT_CONTEXT))
        })?;
        Ok(stream)
    }
}

/// Which HTTP callback to run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum HttpCallback {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
}

/// proxy-wasm's `CONTINUE` and `PAUSE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Continue,
    Pause,
}

/// One request's HTTP context in one VM of a plugin. Dropping it ends the context
/// (`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`).
pub(crate) struct Stream {
    plugin: Arc<Plugin>,
    vm: usize,
    generation: u64,
    context: i32,
    /// What is left of the request's fuel.
    fuel: u64,
    /// The context ended, or its VM is gone.
    closed: bool,
}

impl Stream {
    /// The plugin.
    pub fn plugin(&self) -> &Plugin {
        &self.plugin
    }

    /// Whether the plugin exports `callback` (one it does not have is not called).
    pub fn has(&self, callback: HttpCallback) -> bool {
        let slot = lock(&self.plugin.vms[self.vm]);
        slot.vm.as_ref().is_some_and(|vm| match callback {
            HttpCallback::RequestHeaders => true,
            HttpCallback::RequestBody => vm.callbacks.request_body.is_some(),
            HttpCallback::ResponseHeaders => vm.callbacks.response_headers.is_some(),
            HttpCallback::ResponseBody => vm.callbacks.response_body.is_some(),
        })
    }

    /// Runs `callback` with `view` (headers and body moved in by the caller) as what the
    /// plugin sees; `size` is the header count or body length.
    pub fn run(
        &mut self,
        callback: HttpCallback,
        view: &mut Call,
        size: usize,
        end_of_stream: bool,
    ) -> Result<Action, RunError> {
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        let eos = i32::from(end_of_stream);
        let action = self.call(view, |c, store, context| {
            let f = match callback {
                HttpCallback::RequestHeaders => Some(&c.request_headers),
                HttpCallback::RequestBody => c.request_body.as_ref(),
                HttpCallback::ResponseHeaders => c.response_headers.as_ref(),
                HttpCallback::ResponseBody => c.response_body.as_ref(),
            };
            match f {
                Some(f) => f.call(store, (context, size, eos)),
                None => Ok(0),
            }
        })?;
        Ok(if action == 1 {
            Action::Pause
        } else {
            Action::Continue
        })
    }

    /// Runs `f` in the stream's VM, with `view` swapped in as the callback's view and the
    /// request's remaining fuel; discards the VM if it fails.
    fn call<R>(
        &mut self,
        view: &mut Call,
        f: impl FnOnce(&Callbacks, &mut Store<Host>, i32) -> wasmtime::Result<R>,
    ) -> Result<R, RunError> {
        if self.closed {
            return Err(RunError::Discarded);
        }
        let plugin = &self.plugin;
        let mut slot = lock(&plugin.vms[self.vm]);
        if slot.generation != self.generation {
            self.closed = true;
            return Err(RunError::Discarded);
        }
        let Some(vm) = slot.vm.as_mut() else {
            self.closed = true;
            return Err(RunError::Discarded);
        };
        if vm.store.set_fuel(self.fuel).is_err() {
            self.closed = true;
            return Err(RunError::OutOfFuel(plugin.limits.fuel));
        }
        vm.store.set_epoch_deadline(plugin.limits.ticks);
        std::mem::swap(&mut vm.store.data_mut().call, view);
        let result = f(&vm.callbacks, &mut vm.store, self.context);
        std::mem::swap(&mut vm.store.data_mut().call, view);
        self.fuel = vm.store.get_fuel().unwrap_or(0);
        match result {
            Ok(r) => Ok(r),
            Err(e) => {
                let error = classify(&e, vm.store.data(), &plugin.limits);
                tracing::warn!(plugin = %plugin.info.name, file = %plugin.info.file, %error,
                    "plugin failed; its VM is discarded and the request gets error 11");
                slot.vm = None;
                slot.generation += 1;
                self.closed = true;
                Err(error)
            }
        }
    }

    /// Ends the context: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`. A plugin that
    /// answers `false` from `proxy_on_done` (to finish later) is not waited for: nothing
    /// could resume it.
    pub fn finish(&mut self) {
        if self.closed {
            return;
        }
        let _ = self.call(&mut Call::default(), |c, store, context| {
            if let Some(done) = &c.done {
                done.call(&mut *store, context)?;
            }
            if let Some(log) = &c.log {
                log.call(&mut *store, context)?;
            }
            if let Some(delete) = &c.delete {
                delete.call(&mut *store, context)?;
            }
            Ok(())
        });
        self.closed = true;
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.finish();
    }
}
