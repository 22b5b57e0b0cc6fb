//! The host side of the proxy-wasm ABI: the functions a plugin imports, and the state of the
//! VM they work on ([`Host`]).
//!
//! Every pointer a plugin passes is checked against its memory: a bad one gets
//! `INVALID_MEMORY_ACCESS`, never a trap or a read outside the sandbox. Host functions Kanali
//! does not support (outgoing HTTP/gRPC calls, shared data and queues, timers, foreign
//! functions) answer `UNIMPLEMENTED`. Only `proc_exit` and a plugin's own allocator trapping
//! end a call.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use wasmtime::{
    Caller, Engine, FuncType, IntoFunc, Linker, Memory, ResourceLimiter, TypedFunc, ValType,
};

use super::exchange::RequestProps;

/// `proxy_status_t`.
pub mod status {
    /// Success.
    pub const OK: i32 = 0;
    /// No such key, buffer or map (here).
    pub const NOT_FOUND: i32 = 1;
    /// An argument is out of range.
    pub const BAD_ARGUMENT: i32 = 2;
    /// A serialised map does not parse.
    pub const PARSE_FAILURE: i32 = 4;
    /// A pointer does not point into the plugin's memory.
    pub const INVALID_MEMORY_ACCESS: i32 = 6;
    /// The host failed (e.g. the plugin's allocator returned null).
    pub const INTERNAL_FAILURE: i32 = 10;
    /// Kanali does not implement this host function.
    pub const UNIMPLEMENTED: i32 = 12;
}

/// WASI `errno` values.
const WASI_SUCCESS: i32 = 0;
const WASI_BADF: i32 = 8;
const WASI_FAULT: i32 = 21;
const WASI_INVAL: i32 = 28;
/// "Function not implemented": what unknown WASI functions answer.
pub const WASI_ENOSYS: i32 = 52;
const WASI_NOTSUP: i32 = 58;

/// `proxy_map_type_t` and `proxy_buffer_type_t` values Kanali serves.
const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_REQUEST_TRAILERS: i32 = 1;
const MAP_RESPONSE_HEADERS: i32 = 2;
const MAP_RESPONSE_TRAILERS: i32 = 3;
const BUFFER_REQUEST_BODY: i32 = 0;
const BUFFER_RESPONSE_BODY: i32 = 1;
const BUFFER_VM_CONFIGURATION: i32 = 6;
const BUFFER_PLUGIN_CONFIGURATION: i32 = 7;

/// Which callback is running: what the host functions may see and change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Root context callbacks (start, configure), context creation and `proxy_on_done`.
    #[default]
    Root,
    /// `proxy_on_request_headers`.
    RequestHeaders,
    /// `proxy_on_request_body`.
    RequestBody,
    /// `proxy_on_response_headers`.
    ResponseHeaders,
    /// `proxy_on_response_body`.
    ResponseBody,
}

impl Phase {
    fn request(self) -> bool {
        matches!(self, Phase::RequestHeaders | Phase::RequestBody)
    }

    fn response(self) -> bool {
        matches!(self, Phase::ResponseHeaders | Phase::ResponseBody)
    }
}

/// A response a plugin asked to send instead of going on (`proxy_send_local_response`).
#[derive(Debug)]
pub struct LocalResponse {
    /// Its status.
    pub status: StatusCode,
    /// Its headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Its body.
    pub body: Bytes,
}

/// What the running callback works on. Headers and bodies are moved in before a callback
/// and out after it, so no copy is made and nothing outlives the call.
#[derive(Debug, Default)]
pub struct Call {
    /// Which callback runs.
    pub phase: Phase,
    /// The request's properties, in request and response callbacks.
    pub props: Option<Arc<RequestProps>>,
    /// The request headers (without pseudo-headers): the live ones in request callbacks, the
    /// ones sent upstream (read-only) in response callbacks.
    pub request_headers: HeaderMap,
    /// The response headers, in response callbacks.
    pub response_headers: HeaderMap,
    /// The response status, in response callbacks (`:status`).
    pub status: StatusCode,
    /// The body of a body callback.
    pub body: Vec<u8>,
    /// Whether the plugin changed `body`.
    pub body_changed: bool,
    /// A local response the plugin sent.
    pub local: Option<LocalResponse>,
}

/// Enforces the memory limit; remembers that it did, so the failure is reported as such.
#[derive(Debug)]
pub struct Limiter {
    /// Largest linear memory, in bytes.
    pub memory_limit: usize,
    /// Set when a growth past the limit was refused.
    pub exceeded: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.exceeded = true;
            // An error (a trap) rather than `false` (memory.grow returning -1): a plugin that
            // ignores the failure would otherwise write to memory it does not have.
            return Err(wasmtime::Error::msg(format!(
                "memory limit of {} bytes exceeded",
                self.memory_limit
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The state of one VM: what the host functions read and change.
pub struct Host {
    /// The memory limit.
    pub limiter: Limiter,
    /// The plugin's name, for its log lines.
    pub plugin: Arc<str>,
    /// Its configuration (`PLUGIN_CONFIGURATION`).
    pub config: Arc<[u8]>,
    /// Its exported memory, once instantiated.
    pub memory: Option<Memory>,
    /// Its allocator, for values the host hands over.
    pub alloc: Option<TypedFunc<i32, i32>>,
    /// The running callback's view.
    pub call: Call,
    /// Metrics it defined (accepted and kept per VM, not exported yet).
    metrics: Vec<i64>,
}

impl Host {
    /// The state of a VM of `plugin` before instantiation.
    pub fn new(plugin: Arc<str>, config: Arc<[u8]>, memory_limit: usize) -> Host {
        Host {
            limiter: Limiter {
                memory_limit,
                exceeded: false,
            },
            plugin,
            config,
            memory: None,
            alloc: None,
            call: Call::default(),
            metrics: Vec::new(),
        }
    }
}

/// The host functions, and the names they are defined under (so a module's other imports can
/// be stubbed).
#[derive(Clone)]
pub struct HostFunctions {
    /// Every host function, shared by all modules.
    pub linker: Linker<Host>,
    names: Arc<HashSet<(&'static str, &'static str)>>,
}

impl HostFunctions {
    /// Whether `module.name` is a host function Kanali defines.
    pub fn defines(&self, module: &str, name: &str) -> bool {
        self.names.contains(&(module, name))
    }
}

struct Builder {
    linker: Linker<Host>,
    names: HashSet<(&'static str, &'static str)>,
}

impl Builder {
    fn wrap<P, A>(
        &mut self,
        module: &'static str,
        name: &'static str,
        f: impl IntoFunc<Host, P, A>,
    ) -> wasmtime::Result<()> {
        self.names.insert((module, name));
        self.linker.func_wrap(module, name, f)?;
        Ok(())
    }

    /// A function of `params` i32 parameters that answers `UNIMPLEMENTED`.
    fn unimplemented(&mut self, name: &'static str, params: usize) -> wasmtime::Result<()> {
        self.names.insert(("env", name));
        let ty = FuncType::new(
            self.linker.engine(),
            vec![ValType::I32; params],
            [ValType::I32],
        );
        self.linker.func_new("env", name, ty, move |caller, _, out| {
            tracing::debug!(plugin = %caller.data().plugin, call = name, "a plugin called a host function Kanali does not implement");
            if let Some(r) = out.first_mut() {
                *r = wasmtime::Val::I32(status::UNIMPLEMENTED);
            }
            Ok(())
        })?;
        Ok(())
    }
}

// ---- memory -------------------------------------------------------------------------------

fn range(ptr: i32, len: i32) -> Option<std::ops::Range<usize>> {
    // Wasm32 pointers and sizes are unsigned.
    let start = ptr as u32 as usize;
    Some(start..start.checked_add(len as u32 as usize)?)
}

fn slice(mem: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    mem.get(range(ptr, len)?)
}

fn put_u32(mem: &mut [u8], ptr: i32, value: u32) -> Option<()> {
    mem.get_mut(range(ptr, 4)?)?
        .copy_from_slice(&value.to_le_bytes());
    Some(())
}

fn put_u64(mem: &mut [u8], ptr: i32, value: u64) -> Option<()> {
    mem.get_mut(range(ptr, 8)?)?
        .copy_from_slice(&value.to_le_bytes());
    Some(())
}

/// The plugin's memory and the host state, borrowed together.
fn parts<'a>(caller: &'a mut Caller<'_, Host>) -> Option<(&'a mut [u8], &'a mut Host)> {
    let memory = caller.data().memory?;
    Some(memory.data_and_store_mut(caller))
}

/// Hands `bytes` to the plugin: memory from its allocator, the address and size written to
/// `ret_data` and `ret_size`. Empty values are a null pointer with size 0, as Envoy does.
fn copy_out(
    caller: &mut Caller<'_, Host>,
    bytes: &[u8],
    ret_data: i32,
    ret_size: i32,
) -> wasmtime::Result<i32> {
    let Ok(len) = i32::try_from(bytes.len()) else {
        return Ok(status::BAD_ARGUMENT);
    };
    let ptr = if bytes.is_empty() {
        0
    } else {
        let Some(alloc) = caller.data().alloc.clone() else {
            return Ok(status::INTERNAL_FAILURE);
        };
        // Runs plugin code; if that traps, the call it was made from traps too.
        let ptr = alloc.call(&mut *caller, len)?;
        if ptr == 0 {
            return Ok(status::INTERNAL_FAILURE);
        }
        ptr
    };
    let Some((mem, _)) = parts(caller) else {
        return Ok(status::INTERNAL_FAILURE);
    };
    if ptr != 0 {
        let Some(dst) = range(ptr, len).and_then(|r| mem.get_mut(r)) else {
            return Ok(status::INVALID_MEMORY_ACCESS);
        };
        dst.copy_from_slice(bytes);
    }
    if put_u32(mem, ret_data, ptr as u32).is_none() || put_u32(mem, ret_size, len as u32).is_none()
    {
        return Ok(status::INVALID_MEMORY_ACCESS);
    }
    Ok(status::OK)
}

// ---- header maps --------------------------------------------------------------------------

/// Serialises pairs the proxy-wasm way: count, (key length, value length) per pair, then each
/// key and value followed by a NUL.
pub fn serialize_pairs<'a>(pairs: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Vec<u8> {
    let pairs: Vec<(&[u8], &[u8])> = pairs.into_iter().collect();
    let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    let mut out = Vec::with_capacity(4 + bytes);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in &pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in &pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// Parses a serialised map; `None` if it is malformed. An empty input is an empty map.
pub fn parse_pairs(data: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if data.is_empty() || data == [0] {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<usize> {
        let b = data.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let count = word(0)?;
    // Each pair takes at least 10 bytes: rejects absurd counts before allocating.
    if count > data.len() / 10 + 1 {
        return None;
    }
    let mut at = 4usize.checked_add(count.checked_mul(8)?)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let klen = word(4 + i * 8)?;
        let vlen = word(8 + i * 8)?;
        let key = data.get(at..at.checked_add(klen)?)?;
        at = at.checked_add(klen)?.checked_add(1)?;
        let value = data.get(at..at.checked_add(vlen)?)?;
        at = at.checked_add(vlen)?.checked_add(1)?;
        out.push((key, value));
    }
    Some(out)
}

fn scheme_pseudo(props: &RequestProps) -> [(&'static [u8], &[u8]); 4] {
    [
        (b":authority", props.host.as_bytes()),
        (b":path", props.path.as_bytes()),
        (b":method", props.method.as_str().as_bytes()),
        (b":scheme", props.scheme.as_bytes()),
    ]
}

/// A map the running callback may use: which one, and whether it may change it.
enum MapRef {
    Request {
        writable: bool,
    },
    Response {
        writable: bool,
    },
    /// Trailers: Kanali does not expose them (empty, read-only).
    Trailers,
}

fn map_of(call: &Call, map: i32) -> Result<MapRef, i32> {
    match map {
        MAP_REQUEST_HEADERS if call.phase.request() => Ok(MapRef::Request { writable: true }),
        MAP_REQUEST_HEADERS if call.phase.response() => Ok(MapRef::Request { writable: false }),
        MAP_RESPONSE_HEADERS if call.phase.response() => Ok(MapRef::Response { writable: true }),
        MAP_REQUEST_TRAILERS | MAP_RESPONSE_TRAILERS if call.phase != Phase::Root => {
            Ok(MapRef::Trailers)
        }
        0..=7 => Err(status::NOT_FOUND),
        _ => Err(status::BAD_ARGUMENT),
    }
}

fn pairs_of(call: &Call, map: &MapRef) -> Vec<u8> {
    match map {
        MapRef::Request { .. } => {
            let pseudo = call.props.as_deref().map(scheme_pseudo);
            let pseudo = pseudo.iter().flatten().map(|(k, v)| (*k, *v));
            let headers = call
                .request_headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()));
            serialize_pairs(pseudo.chain(headers))
        }
        MapRef::Response { .. } => {
            let status = call.status.as_str().as_bytes();
            let headers = call
                .response_headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()));
            serialize_pairs(std::iter::once((&b":status"[..], status)).chain(headers))
        }
        MapRef::Trailers => Vec::new(),
    }
}

fn map_size(call: &Call, map: &MapRef) -> usize {
    pairs_of(call, map).len()
}

/// A header's value (several joined with `,`), or `None`.
fn value_of(call: &Call, map: &MapRef, key: &[u8]) -> Option<Vec<u8>> {
    let headers = match map {
        MapRef::Request { .. } => {
            if key.starts_with(b":") {
                let props = call.props.as_deref()?;
                return scheme_pseudo(props)
                    .into_iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_vec());
            }
            &call.request_headers
        }
        MapRef::Response { .. } => {
            if key == b":status" {
                return Some(call.status.as_str().as_bytes().to_vec());
            }
            &call.response_headers
        }
        MapRef::Trailers => return None,
    };
    let name = HeaderName::from_bytes(key).ok()?;
    let mut values = headers.get_all(&name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.push(b',');
        out.extend_from_slice(v.as_bytes());
    }
    Some(out)
}

/// How a header map is changed.
#[derive(Clone, Copy)]
enum Edit<'a> {
    Add(&'a [u8]),
    Replace(&'a [u8]),
    Remove,
}

fn edit(call: &mut Call, map: &MapRef, key: &[u8], edit: Edit<'_>) -> i32 {
    let headers = match map {
        MapRef::Request { writable: true } => &mut call.request_headers,
        MapRef::Response { writable: true } => {
            if key == b":status" {
                return match edit {
                    Edit::Replace(v) | Edit::Add(v) => match std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u16>().ok())
                        .and_then(|n| StatusCode::from_u16(n).ok())
                    {
                        Some(s) => {
                            call.status = s;
                            status::OK
                        }
                        None => status::BAD_ARGUMENT,
                    },
                    Edit::Remove => status::BAD_ARGUMENT,
                };
            }
            &mut call.response_headers
        }
        // Headers already sent upstream, and trailers, cannot be changed.
        _ => return status::BAD_ARGUMENT,
    };
    // The request's pseudo-headers are what it was routed by: routing is done.
    let Ok(name) = HeaderName::from_bytes(key) else {
        return status::BAD_ARGUMENT;
    };
    match edit {
        Edit::Remove => {
            headers.remove(&name);
        }
        Edit::Add(v) | Edit::Replace(v) => {
            let Ok(value) = HeaderValue::from_bytes(v) else {
                return status::BAD_ARGUMENT;
            };
            if matches!(edit, Edit::Add(_)) {
                headers.append(name, value);
            } else {
                headers.insert(name, value);
            }
        }
    }
    status::OK
}

fn set_pairs(call: &mut Call, map: &MapRef, data: &[u8]) -> i32 {
    let Some(pairs) = parse_pairs(data) else {
        return status::PARSE_FAILURE;
    };
    let mut headers = HeaderMap::with_capacity(pairs.len());
    let mut new_status = None;
    for (k, v) in pairs {
        if k == b":status" && matches!(map, MapRef::Response { .. }) {
            match std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u16>().ok())
                .and_then(|n| StatusCode::from_u16(n).ok())
            {
                Some(s) => new_status = Some(s),
                None => return status::BAD_ARGUMENT,
            }
            continue;
        }
        // Pseudo-headers come back from a get-modify-set round trip; they are not headers.
        if k.starts_with(b":") {
            continue;
        }
        match (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => return status::BAD_ARGUMENT,
        }
    }
    match map {
        MapRef::Request { writable: true } => call.request_headers = headers,
        MapRef::Response { writable: true } => {
            call.response_headers = headers;
            if let Some(s) = new_status {
                call.status = s;
            }
        }
        _ => return status::BAD_ARGUMENT,
    }
    status::OK
}

// ---- buffers ------------------------------------------------------------------------------

fn buffer_of(host: &Host, buffer: i32) -> Result<&[u8], i32> {
    match buffer {
        BUFFER_REQUEST_BODY if host.call.phase == Phase::RequestBody => Ok(&host.call.body),
        BUFFER_RESPONSE_BODY if host.call.phase == Phase::ResponseBody => Ok(&host.call.body),
        BUFFER_VM_CONFIGURATION => Ok(&[]),
        BUFFER_PLUGIN_CONFIGURATION => Ok(&host.config),
        0..=8 => Err(status::NOT_FOUND),
        _ => Err(status::BAD_ARGUMENT),
    }
}

// ---- properties ---------------------------------------------------------------------------

fn property(host: &Host, path: &[u8]) -> Option<Vec<u8>> {
    // Paths come as segments separated by NUL (`request\0path`); `request.path` works too.
    let path: Vec<u8> = path
        .iter()
        .map(|b| if *b == 0 { b'.' } else { *b })
        .collect();
    if path == b"plugin_name" {
        return Some(host.plugin.as_bytes().to_vec());
    }
    let props = host.call.props.as_deref()?;
    Some(match &path[..] {
        b"request.path" => props.path.as_bytes().to_vec(),
        b"request.url_path" => props
            .path
            .split('?')
            .next()
            .unwrap_or("")
            .as_bytes()
            .to_vec(),
        b"request.host" => props.host.as_bytes().to_vec(),
        b"request.method" => props.method.as_str().as_bytes().to_vec(),
        b"request.scheme" => props.scheme.as_bytes().to_vec(),
        b"request.protocol" => props.protocol.as_bytes().to_vec(),
        b"request.id" => props.id.as_bytes().to_vec(),
        b"source.address" => props.source.to_string().into_bytes(),
        // Numbers are 8 bytes, little-endian, as Envoy encodes them.
        b"source.port" => u64::from(props.source.port()).to_le_bytes().to_vec(),
        b"response.code" if host.call.phase.response() => {
            u64::from(host.call.status.as_u16()).to_le_bytes().to_vec()
        }
        _ => return None,
    })
}

// ---- logging ------------------------------------------------------------------------------

fn log(plugin: &str, level: i32, message: &str) -> bool {
    match level {
        0 => tracing::trace!(%plugin, "{message}"),
        1 => tracing::debug!(%plugin, "{message}"),
        2 => tracing::info!(%plugin, "{message}"),
        3 => tracing::warn!(%plugin, "{message}"),
        4 | 5 => tracing::error!(%plugin, "{message}"),
        _ => return false,
    }
    true
}

fn current_log_level() -> i32 {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => 0,
        LevelFilter::DEBUG => 1,
        LevelFilter::INFO => 2,
        LevelFilter::WARN => 3,
        _ => 4,
    }
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

// ---- the functions ------------------------------------------------------------------------

macro_rules! try_status {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(status) => return Ok(status),
        }
    };
}

/// All host functions, on `engine`.
pub fn host_functions(engine: &Engine) -> wasmtime::Result<HostFunctions> {
    let mut b = Builder {
        linker: Linker::new(engine),
        names: HashSet::new(),
    };
    b.wrap(
        "env",
        "proxy_log",
        |mut caller: Caller<'_, Host>, level: i32, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let Some((mem, host)) = parts(&mut caller) else {
                return Ok(status::INTERNAL_FAILURE);
            };
            let Some(bytes) = slice(mem, ptr, len) else {
                return Ok(status::INVALID_MEMORY_ACCESS);
            };
            let message = String::from_utf8_lossy(bytes);
            Ok(if log(&host.plugin, level, &message) {
                status::OK
            } else {
                status::BAD_ARGUMENT
            })
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_log_level",
        |mut caller: Caller<'_, Host>, ret: i32| -> i32 {
            match parts(&mut caller) {
                Some((mem, _)) => match put_u32(mem, ret, current_log_level() as u32) {
                    Some(()) => status::OK,
                    None => status::INVALID_MEMORY_ACCESS,
                },
                None => status::INTERNAL_FAILURE,
            }
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut caller: Caller<'_, Host>, ret: i32| -> i32 {
            match parts(&mut caller) {
                Some((mem, _)) => match put_u64(mem, ret, unix_nanos()) {
                    Some(()) => status::OK,
                    None => status::INVALID_MEMORY_ACCESS,
                },
                None => status::INTERNAL_FAILURE,
            }
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         buffer: i32,
         start: i32,
         max: i32,
         ret_data: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let bytes = {
                let host = caller.data();
                let all = try_status!(buffer_of(host, buffer));
                let start = start as u32 as usize;
                if start > all.len() {
                    return Ok(status::BAD_ARGUMENT);
                }
                let end = start.saturating_add(max as u32 as usize).min(all.len());
                all[start..end].to_vec()
            };
            copy_out(&mut caller, &bytes, ret_data, ret_size)
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_buffer_status",
        |mut caller: Caller<'_, Host>, buffer: i32, ret_size: i32, ret_flags: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let len = match buffer_of(host, buffer) {
                Ok(b) => b.len(),
                Err(s) => return s,
            };
            match (
                put_u32(mem, ret_size, len as u32),
                put_u32(mem, ret_flags, 0),
            ) {
                (Some(()), Some(())) => status::OK,
                _ => status::INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    b.wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut caller: Caller<'_, Host>,
         buffer: i32,
         start: i32,
         size: i32,
         ptr: i32,
         len: i32|
         -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let writable = matches!(
                (buffer, host.call.phase),
                (BUFFER_REQUEST_BODY, Phase::RequestBody)
                    | (BUFFER_RESPONSE_BODY, Phase::ResponseBody)
            );
            if !writable {
                return if (0..=8).contains(&buffer) {
                    status::NOT_FOUND
                } else {
                    status::BAD_ARGUMENT
                };
            }
            let Some(value) = slice(mem, ptr, len) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            // Replace `size` bytes at `start`: start 0 and size 0 prepends, a start at or past
            // the end appends.
            let body = &mut host.call.body;
            let start = (start as u32 as usize).min(body.len());
            let end = start.saturating_add(size as u32 as usize).min(body.len());
            body.splice(start..end, value.iter().copied());
            host.call.body_changed = true;
            status::OK
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut caller: Caller<'_, Host>, map: i32, ret_data: i32, ret_size: i32| {
            let bytes = {
                let call = &caller.data().call;
                let map = try_status!(map_of(call, map));
                pairs_of(call, &map)
            };
            copy_out(&mut caller, &bytes, ret_data, ret_size)
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_header_map_size",
        |mut caller: Caller<'_, Host>, map: i32, ret_size: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let size = match map_of(&host.call, map) {
                Ok(m) => map_size(&host.call, &m),
                Err(s) => return s,
            };
            match put_u32(mem, ret_size, size as u32) {
                Some(()) => status::OK,
                None => status::INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    b.wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut caller: Caller<'_, Host>, map: i32, ptr: i32, len: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let map = match map_of(&host.call, map) {
                Ok(m) => m,
                Err(s) => return s,
            };
            let Some(data) = slice(mem, ptr, len) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            set_pairs(&mut host.call, &map, data)
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_header_map_value",
        |mut caller: Caller<'_, Host>,
         map: i32,
         key_ptr: i32,
         key_len: i32,
         ret_data: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let value = {
                let Some((mem, host)) = parts(&mut caller) else {
                    return Ok(status::INTERNAL_FAILURE);
                };
                let map = try_status!(map_of(&host.call, map));
                let Some(key) = slice(mem, key_ptr, key_len) else {
                    return Ok(status::INVALID_MEMORY_ACCESS);
                };
                match value_of(&host.call, &map, key) {
                    Some(v) => v,
                    None => return Ok(status::NOT_FOUND),
                }
            };
            copy_out(&mut caller, &value, ret_data, ret_size)
        },
    )?;
    for (name, kind) in [
        ("proxy_add_header_map_value", 0),
        ("proxy_replace_header_map_value", 1),
    ] {
        b.wrap(
            "env",
            name,
            move |mut caller: Caller<'_, Host>,
                  map: i32,
                  key_ptr: i32,
                  key_len: i32,
                  value_ptr: i32,
                  value_len: i32|
                  -> i32 {
                let Some((mem, host)) = parts(&mut caller) else {
                    return status::INTERNAL_FAILURE;
                };
                let map = match map_of(&host.call, map) {
                    Ok(m) => m,
                    Err(s) => return s,
                };
                let (Some(key), Some(value)) = (
                    slice(mem, key_ptr, key_len),
                    slice(mem, value_ptr, value_len),
                ) else {
                    return status::INVALID_MEMORY_ACCESS;
                };
                let op = if kind == 0 {
                    Edit::Add(value)
                } else {
                    Edit::Replace(value)
                };
                edit(&mut host.call, &map, key, op)
            },
        )?;
    }
    b.wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut caller: Caller<'_, Host>, map: i32, key_ptr: i32, key_len: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let map = match map_of(&host.call, map) {
                Ok(m) => m,
                Err(s) => return s,
            };
            let Some(key) = slice(mem, key_ptr, key_len) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            edit(&mut host.call, &map, key, Edit::Remove)
        },
    )?;
    b.wrap(
        "env",
        "proxy_get_property",
        |mut caller: Caller<'_, Host>,
         path_ptr: i32,
         path_len: i32,
         ret_data: i32,
         ret_size: i32|
         -> wasmtime::Result<i32> {
            let value = {
                let Some((mem, host)) = parts(&mut caller) else {
                    return Ok(status::INTERNAL_FAILURE);
                };
                let Some(path) = slice(mem, path_ptr, path_len) else {
                    return Ok(status::INVALID_MEMORY_ACCESS);
                };
                match property(host, path) {
                    Some(v) => v,
                    None => return Ok(status::NOT_FOUND),
                }
            };
            copy_out(&mut caller, &value, ret_data, ret_size)
        },
    )?;
    b.wrap(
        "env",
        "proxy_send_local_response",
        |mut caller: Caller<'_, Host>,
         code: i32,
         _details_ptr: i32,
         _details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32|
         -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            if host.call.phase == Phase::Root {
                return status::BAD_ARGUMENT;
            }
            let (Some(body), Some(headers)) = (
                slice(mem, body_ptr, body_len),
                slice(mem, headers_ptr, headers_len),
            ) else {
                return status::INVALID_MEMORY_ACCESS;
            };
            let Some(code) = u16::try_from(code)
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            else {
                return status::BAD_ARGUMENT;
            };
            let Some(pairs) = parse_pairs(headers) else {
                return status::PARSE_FAILURE;
            };
            let mut list = Vec::with_capacity(pairs.len());
            for (k, v) in pairs {
                match (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
                    (Ok(k), Ok(v)) => list.push((k, v)),
                    _ => return status::BAD_ARGUMENT,
                }
            }
            host.call.local = Some(LocalResponse {
                status: code,
                headers: list,
                body: Bytes::copy_from_slice(body),
            });
            status::OK
        },
    )?;
    // Kanali never waits on a plugin (there are no calls or timers that could resume it), so
    // continuing is always fine, and there is no route cache to clear: routing is done.
    b.wrap("env", "proxy_continue_stream", |_: i32| status::OK)?;
    b.wrap("env", "proxy_continue_request", || status::OK)?;
    b.wrap("env", "proxy_continue_response", || status::OK)?;
    b.wrap("env", "proxy_clear_route_cache", || status::OK)?;
    b.wrap("env", "proxy_set_effective_context", |_: i32| status::OK)?;
    b.wrap("env", "proxy_done", || status::NOT_FOUND)?;
    // Metrics are accepted (SDKs panic when defining one fails) and kept per VM.
    b.wrap(
        "env",
        "proxy_define_metric",
        |mut caller: Caller<'_, Host>, kind: i32, _name_ptr: i32, _name_len: i32, ret: i32| {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            if !(0..=2).contains(&kind) {
                return status::BAD_ARGUMENT;
            }
            host.metrics.push(0);
            match put_u32(mem, ret, host.metrics.len() as u32) {
                Some(()) => status::OK,
                None => status::INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    for (name, add) in [
        ("proxy_increment_metric", true),
        ("proxy_record_metric", false),
    ] {
        b.wrap(
            "env",
            name,
            move |mut caller: Caller<'_, Host>, id: i32, value: i64| -> i32 {
                let host = caller.data_mut();
                let Some(metric) = (id as u32 as usize)
                    .checked_sub(1)
                    .and_then(|i| host.metrics.get_mut(i))
                else {
                    return status::NOT_FOUND;
                };
                *metric = if add {
                    metric.saturating_add(value)
                } else {
                    value
                };
                status::OK
            },
        )?;
    }
    b.wrap(
        "env",
        "proxy_get_metric",
        |mut caller: Caller<'_, Host>, id: i32, ret: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return status::INTERNAL_FAILURE;
            };
            let Some(value) = (id as u32 as usize)
                .checked_sub(1)
                .and_then(|i| host.metrics.get(i))
            else {
                return status::NOT_FOUND;
            };
            match put_u64(mem, ret, *value as u64) {
                Some(()) => status::OK,
                None => status::INVALID_MEMORY_ACCESS,
            }
        },
    )?;
    for (name, params) in [
        ("proxy_set_tick_period_milliseconds", 1),
        ("proxy_set_property", 4),
        ("proxy_get_shared_data", 5),
        ("proxy_set_shared_data", 5),
        ("proxy_register_shared_queue", 3),
        ("proxy_resolve_shared_queue", 5),
        ("proxy_dequeue_shared_queue", 3),
        ("proxy_enqueue_shared_queue", 3),
        ("proxy_http_call", 10),
        ("proxy_grpc_call", 12),
        ("proxy_grpc_stream", 9),
        ("proxy_grpc_send", 4),
        ("proxy_grpc_cancel", 1),
        ("proxy_grpc_close", 1),
        ("proxy_get_status", 3),
        ("proxy_call_foreign_function", 6),
        ("proxy_close_stream", 1),
    ] {
        b.unimplemented(name, params)?;
    }
    wasi(&mut b)?;
    Ok(HostFunctions {
        linker: b.linker,
        names: Arc::new(b.names),
    })
}

/// The WASI functions proxy-wasm names (plugins built for `wasm32-wasi` import them): logging
/// through stdout and stderr, clocks, randomness, and an empty environment.
fn wasi(b: &mut Builder) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    b.wrap(
        W,
        "fd_write",
        |mut caller: Caller<'_, Host>, fd: i32, iovs: i32, count: i32, ret: i32| -> i32 {
            let Some((mem, host)) = parts(&mut caller) else {
                return WASI_FAULT;
            };
            if !(1..=2).contains(&fd) {
                return WASI_BADF;
            }
            let mut text = Vec::new();
            for i in 0..count.max(0) {
                let at = iovs.wrapping_add(i.wrapping_mul(8));
                let Some(iov) = slice(mem, at, 8) else {
                    return WASI_FAULT;
                };
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Some(bytes) = slice(mem, ptr, len) else {
                    return WASI_FAULT;
                };
                text.extend_from_slice(bytes);
            }
            let message = String::from_utf8_lossy(&text);
            let message = message.trim_end_matches('\n');
            log(&host.plugin, if fd == 1 { 2 } else { 4 }, message);
            match put_u32(mem, ret, text.len() as u32) {
                Some(()) => WASI_SUCCESS,
                None => WASI_FAULT,
            }
        },
    )?;
    b.wrap(
        W,
        "clock_time_get",
        |mut caller: Caller<'_, Host>, clock: i32, _precision: i64, ret: i32| -> i32 {
            let Some((mem, _)) = parts(&mut caller) else {
                return WASI_FAULT;
            };
            let now = match clock {
                0 => unix_nanos(),
                1 => monotonic_nanos(),
                _ => return WASI_NOTSUP,
            };
            match put_u64(mem, ret, now) {
                Some(()) => WASI_SUCCESS,
                None => WASI_FAULT,
            }
        },
    )?;
    b.wrap(
        W,
        "random_get",
        |mut caller: Caller<'_, Host>, ptr: i32, len: i32| -> i32 {
            let Some((mem, _)) = parts(&mut caller) else {
                return WASI_FAULT;
            };
            if len as u32 > 1024 * 1024 {
                return WASI_INVAL;
            }
            let Some(dst) = range(ptr, len).and_then(|r| mem.get_mut(r)) else {
                return WASI_FAULT;
            };
            match getrandom::fill(dst) {
                Ok(()) => WASI_SUCCESS,
                Err(_) => WASI_NOTSUP,
            }
        },
    )?;
    for name in ["environ_sizes_get", "args_sizes_get"] {
        b.wrap(
            W,
            name,
            |mut caller: Caller<'_, Host>, count: i32, size: i32| -> i32 {
                let Some((mem, _)) = parts(&mut caller) else {
                    return WASI_FAULT;
                };
                match (put_u32(mem, count, 0), put_u32(mem, size, 0)) {
                    (Some(()), Some(())) => WASI_SUCCESS,
                    _ => WASI_FAULT,
                }
            },
        )?;
    }
    for name in ["environ_get", "args_get"] {
        b.wrap(W, name, |_: i32, _: i32| WASI_SUCCESS)?;
    }
    b.wrap(W, "sched_yield", || WASI_SUCCESS)?;
    b.wrap(W, "proc_exit", |code: i32| -> wasmtime::Result<()> {
        // The module asked to end: there is no process to end, so the call ends (a trap).
        Err(wasmtime::Error::msg(format!(
            "the plugin called proc_exit({code})"
        )))
    })?;
    Ok(())
}

fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip_and_malformed_maps_are_refused() {
        let pairs: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"b", b"22")];
        let data = serialize_pairs(pairs.iter().copied());
        // The spec's example.
        assert_eq!(
            data,
            [
                2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, b'a', 0, b'1', 0, b'b',
                0, b'2', b'2', 0
            ]
        );
        assert_eq!(parse_pairs(&data).unwrap(), pairs);
        assert_eq!(parse_pairs(&[]).unwrap(), Vec::<(&[u8], &[u8])>::new());
        assert_eq!(parse_pairs(&[0]).unwrap(), Vec::<(&[u8], &[u8])>::new());
        for bad in [
            &data[..data.len() - 2],
            &[5, 0, 0, 0][..],
            &[0xff, 0xff, 0xff, 0xff, 0, 0][..],
            &[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0][..],
        ] {
            assert_eq!(parse_pairs(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn memory_ranges_never_wrap() {
        let mem = [0u8; 16];
        assert!(slice(&mem, 0, 16).is_some());
        assert!(slice(&mem, 1, 16).is_none());
        assert!(slice(&mem, -1, 2).is_none());
        assert!(slice(&mem, 8, -1).is_none());
        let mut mem = [0u8; 8];
        assert!(put_u32(&mut mem, 4, 7).is_some());
        assert!(put_u32(&mut mem, 5, 7).is_none());
        assert!(put_u64(&mut mem, 0, 7).is_some());
        assert!(put_u64(&mut mem, 1, 7).is_none());
    }
}
