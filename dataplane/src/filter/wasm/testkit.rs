//! A tiny proxy-wasm "SDK" in WebAssembly text, for tests and benchmarks (there is no Rust
//! wasm target on our machines): [`Wat`] writes a complete module — the ABI marker, memory,
//! an allocator, every host import — around the callback bodies a test gives, and its
//! helpers write the host calls (add a header, answer locally, ...) as WAT instructions.
//! Compile the text with the `wat` crate.
//!
//! ```text
//! let mut p = Wat::new();
//! let add = p.add_header(Map::Request, "x-hello", "world");
//! p.on_request_headers(&format!("{add} (i32.const 0)"));
//! let wasm = wat::parse_str(p.build())?;
//! ```

use std::fmt::Write as _;

use super::abi::serialize_pairs;

/// Where a callback's host call returns a pointer (4 bytes) and a size (4 bytes).
pub const RET_PTR: u32 = 16;
/// See [`RET_PTR`].
pub const RET_LEN: u32 = 20;
/// Where the plugin's constant strings start.
const DATA_START: u32 = 1024;
/// Where the allocator's heap starts (the second page).
const HEAP_START: u32 = 65536;

/// `proxy_map_type_t`.
#[derive(Clone, Copy, Debug)]
pub enum Map {
    /// Request headers.
    Request = 0,
    /// Response headers.
    Response = 2,
}

/// `proxy_buffer_type_t` of the bodies.
#[derive(Clone, Copy, Debug)]
pub enum Buffer {
    /// The request body.
    Request = 0,
    /// The response body.
    Response = 1,
    /// The plugin configuration.
    Configuration = 7,
}

/// A constant in the module's memory.
#[derive(Clone, Copy, Debug)]
pub struct Str {
    /// Its address.
    pub ptr: u32,
    /// Its length.
    pub len: u32,
}

impl Str {
    /// `(i32.const ptr) (i32.const len)`.
    pub fn args(self) -> String {
        format!("(i32.const {}) (i32.const {})", self.ptr, self.len)
    }
}

/// A proxy-wasm module under construction.
#[derive(Clone, Debug)]
pub struct Wat {
    data: Vec<u8>,
    abi: String,
    callbacks: Vec<(&'static str, &'static str, String)>,
    omit: Vec<String>,
    imports: Vec<String>,
    raw: Vec<String>,
    memory_pages: u32,
}

impl Default for Wat {
    fn default() -> Self {
        Self::new()
    }
}

/// The signature of each callback a test may write, and what it does by default.
const CALLBACKS: &[(&str, &str, &str)] = &[
    (
        "proxy_on_context_create",
        "(param $ctx i32) (param $parent i32)",
        "",
    ),
    (
        "proxy_on_vm_start",
        "(param $ctx i32) (param $size i32) (result i32)",
        "(i32.const 1)",
    ),
    (
        "proxy_on_configure",
        "(param $ctx i32) (param $size i32) (result i32)",
        "(i32.const 1)",
    ),
    (
        "proxy_on_request_headers",
        "(param $ctx i32) (param $n i32) (param $eos i32) (result i32)",
        "(i32.const 0)",
    ),
    (
        "proxy_on_request_body",
        "(param $ctx i32) (param $size i32) (param $eos i32) (result i32)",
        "(i32.const 0)",
    ),
    (
        "proxy_on_response_headers",
        "(param $ctx i32) (param $n i32) (param $eos i32) (result i32)",
        "(i32.const 0)",
    ),
    (
        "proxy_on_response_body",
        "(param $ctx i32) (param $size i32) (param $eos i32) (result i32)",
        "(i32.const 0)",
    ),
    (
        "proxy_on_done",
        "(param $ctx i32) (result i32)",
        "(i32.const 1)",
    ),
    ("proxy_on_log", "(param $ctx i32)", ""),
    ("proxy_on_delete", "(param $ctx i32)", ""),
];

/// The host functions the helpers call.
const IMPORTS: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send_local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
"#;

impl Wat {
    /// A module whose callbacks all continue.
    pub fn new() -> Wat {
        Wat {
            data: Vec::new(),
            abi: "proxy_abi_version_0_2_1".to_owned(),
            callbacks: Vec::new(),
            omit: Vec::new(),
            imports: Vec::new(),
            raw: Vec::new(),
            memory_pages: 2,
        }
    }

    /// Puts `bytes` in the module's memory.
    pub fn bytes(&mut self, bytes: &[u8]) -> Str {
        let ptr = DATA_START + self.data.len() as u32;
        self.data.extend_from_slice(bytes);
        Str {
            ptr,
            len: bytes.len() as u32,
        }
    }

    /// Exports another ABI marker instead of `proxy_abi_version_0_2_1`.
    pub fn abi(&mut self, marker: &str) -> &mut Self {
        marker.clone_into(&mut self.abi);
        self
    }

    /// Leaves out an export (`memory`, `proxy_on_memory_allocate`, a callback).
    pub fn omit(&mut self, export: &str) -> &mut Self {
        self.omit.push(export.to_owned());
        self
    }

    /// Adds an import as written (imports must precede every definition).
    pub fn import(&mut self, wat: &str) -> &mut Self {
        self.imports.push(wat.to_owned());
        self
    }

    /// Adds module fields as written (functions, exports, globals).
    pub fn raw(&mut self, wat: &str) -> &mut Self {
        self.raw.push(wat.to_owned());
        self
    }

    /// The initial memory, in 64 KiB pages (2 by default).
    pub fn memory_pages(&mut self, pages: u32) -> &mut Self {
        self.memory_pages = pages.max(2);
        self
    }

    fn set(&mut self, name: &'static str, body: &str) -> &mut Self {
        let signature = CALLBACKS
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or("", |(_, s, _)| s);
        self.callbacks.retain(|(n, _, _)| *n != name);
        self.callbacks.push((name, signature, body.to_owned()));
        self
    }

    /// `proxy_on_configure`'s body (params `$ctx`, `$size`; returns 1 to accept).
    pub fn on_configure(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_configure", body)
    }

    /// `proxy_on_vm_start`'s body.
    pub fn on_vm_start(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_vm_start", body)
    }

    /// `proxy_on_request_headers`'s body (params `$ctx`, `$n`, `$eos`; returns the action).
    pub fn on_request_headers(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_request_headers", body)
    }

    /// `proxy_on_request_body`'s body (params `$ctx`, `$size`, `$eos`).
    pub fn on_request_body(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_request_body", body)
    }

    /// `proxy_on_response_headers`'s body (params `$ctx`, `$n`, `$eos`).
    pub fn on_response_headers(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_response_headers", body)
    }

    /// `proxy_on_response_body`'s body (params `$ctx`, `$size`, `$eos`).
    pub fn on_response_body(&mut self, body: &str) -> &mut Self {
        self.set("proxy_on_response_body", body)
    }

    /// Instructions that add header `name: value` to `map`.
    pub fn add_header(&mut self, map: Map, name: &str, value: &str) -> String {
        let (k, v) = (self.bytes(name.as_bytes()), self.bytes(value.as_bytes()));
        format!(
            "(drop (call $add_header (i32.const {}) {} {}))",
            map as i32,
            k.args(),
            v.args()
        )
    }

    /// Instructions that set header `name: value` in `map`, replacing any other value.
    pub fn replace_header(&mut self, map: Map, name: &str, value: &str) -> String {
        let (k, v) = (self.bytes(name.as_bytes()), self.bytes(value.as_bytes()));
        format!(
            "(drop (call $replace_header (i32.const {}) {} {}))",
            map as i32,
            k.args(),
            v.args()
        )
    }

    /// Instructions that remove header `name` from `map`.
    pub fn remove_header(&mut self, map: Map, name: &str) -> String {
        let k = self.bytes(name.as_bytes());
        format!(
            "(drop (call $remove_header (i32.const {}) {}))",
            map as i32,
            k.args()
        )
    }

    /// An expression: the status of looking up header `name` in `map` (0: present); the
    /// value's address and size land at [`RET_PTR`] and [`RET_LEN`].
    pub fn get_header(&mut self, map: Map, name: &str) -> String {
        let k = self.bytes(name.as_bytes());
        format!(
            "(call $get_header (i32.const {}) {} (i32.const {RET_PTR}) (i32.const {RET_LEN}))",
            map as i32,
            k.args()
        )
    }

    /// An expression: the status of reading property `path` (segments joined with `.`, sent
    /// NUL-separated as SDKs do); the value lands at [`RET_PTR`] and [`RET_LEN`].
    pub fn get_property(&mut self, path: &str) -> String {
        let p = self.bytes(path.replace('.', "\0").as_bytes());
        format!(
            "(call $get_property {} (i32.const {RET_PTR}) (i32.const {RET_LEN}))",
            p.args()
        )
    }

    /// Instructions that add header `name` to `map` with the value at [`RET_PTR`] /
    /// [`RET_LEN`] (what the last get wrote).
    pub fn add_header_from_ret(&mut self, map: Map, name: &str) -> String {
        let k = self.bytes(name.as_bytes());
        format!(
            "(drop (call $add_header (i32.const {}) {} (i32.load (i32.const {RET_PTR})) (i32.load (i32.const {RET_LEN}))))",
            map as i32,
            k.args()
        )
    }

    /// Instructions that answer locally with `status`, `body` and `headers`.
    pub fn send_local(&mut self, status: u16, body: &str, headers: &[(&str, &str)]) -> String {
        let b = self.bytes(body.as_bytes());
        let h = serialize_pairs(headers.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())));
        let h = self.bytes(&h);
        format!(
            "(drop (call $send_local (i32.const {status}) (i32.const 0) (i32.const 0) {} {} (i32.const -1)))",
            b.args(),
            h.args()
        )
    }

    /// Instructions that log `message` at `level` (0 trace .. 4 error).
    pub fn log(&mut self, level: i32, message: &str) -> String {
        let m = self.bytes(message.as_bytes());
        format!("(drop (call $log (i32.const {level}) {}))", m.args())
    }

    /// The module's text.
    pub fn build(&self) -> String {
        let mut out = String::from("(module\n");
        out.push_str(IMPORTS);
        for import in &self.imports {
            let _ = writeln!(out, "  {import}");
        }
        if !self.omit.iter().any(|o| o == "memory") {
            let _ = writeln!(out, "  (memory (export \"memory\") {})", self.memory_pages);
        } else {
            let _ = writeln!(out, "  (memory {})", self.memory_pages);
        }
        let _ = writeln!(out, "  (global $heap (mut i32) (i32.const {HEAP_START}))");
        // A bump allocator that grows memory as needed (tests never free).
        if !self.omit.iter().any(|o| o == "proxy_on_memory_allocate") {
            out.push_str(
                r#"  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (global.get $heap) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.div_u (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536))) (i32.const 65536)) (i32.const 1))))))
    (local.get $at))
"#,
            );
        }
        if !self.abi.is_empty() {
            let _ = writeln!(out, "  (func (export \"{}\"))", self.abi);
        }
        for (name, signature, default) in CALLBACKS {
            if self.omit.iter().any(|o| o == name) {
                continue;
            }
            let body = self
                .callbacks
                .iter()
                .find(|(n, _, _)| n == name)
                .map_or(*default, |(_, _, b)| b.as_str());
            let _ = writeln!(out, "  (func (export \"{name}\") {signature}\n    {body})");
        }
        for raw in &self.raw {
            let _ = writeln!(out, "  {raw}");
        }
        if !self.data.is_empty() {
            let escaped: String = self.data.iter().map(|b| format!("\\{b:02x}")).collect();
            let _ = writeln!(out, "  (data (i32.const {DATA_START}) \"{escaped}\")");
        }
        out.push_str(")\n");
        out
    }
}

/// A plugin that adds `name: value` to the request headers and to the response headers: the
/// trivial plugin of the benchmark.
pub fn header_plugin(name: &str, value: &str) -> String {
    let mut p = Wat::new();
    let request = p.add_header(Map::Request, name, value);
    let response = p.add_header(Map::Response, name, value);
    p.on_request_headers(&format!("{request} (i32.const 0)"));
    p.on_response_headers(&format!("{response} (i32.const 0)"));
    p.build()
}
