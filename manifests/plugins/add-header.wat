;; The example plugin of manifests/plugins/: adds `x-kanali-plugin: example` to every request
;; (the upstream sees it) and every response (the client sees it). A proxy-wasm 0.2.1 HTTP
;; filter in WebAssembly text; `wat2wasm add-header.wat` (or the `wat` crate) makes the module
;; that plugins-configmap.yaml carries, base64-encoded. Real plugins are usually written with a
;; proxy-wasm SDK (Rust, Go, C++, AssemblyScript) instead.
(module
  (import "env" "proxy_add_header_map_value"
    (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; The host copies values into plugin memory through this allocator; this plugin never asks
  ;; for any, so a bump allocator that never frees is enough.
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $at i32)
    (local.set $at (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $size)))
    (local.get $at))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param $context i32) (param $parent i32))
  ;; map 0: request headers; map 2: response headers. Name at 0 (15 bytes), value at 16 (7).
  (func (export "proxy_on_request_headers") (param $context i32) (param $headers i32) (param $end i32) (result i32)
    (drop (call $add_header (i32.const 0) (i32.const 0) (i32.const 15) (i32.const 16) (i32.const 7)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $context i32) (param $headers i32) (param $end i32) (result i32)
    (drop (call $add_header (i32.const 2) (i32.const 0) (i32.const 15) (i32.const 16) (i32.const 7)))
    (i32.const 0))
  (data (i32.const 0) "x-kanali-plugin")
  (data (i32.const 16) "example"))
