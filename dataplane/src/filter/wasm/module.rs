//! Loading a module: compile it and check that it speaks proxy-wasm 0.2.x, classifying what
//! is wrong by the error code its routes answer (spec: issue #11).
//!
//! In this order: not WebAssembly → 03 (`PluginInvalid`); a required export missing
//! (`memory`, an allocator, `proxy_on_context_create`, `proxy_on_request_headers`) → 04
//! (`PluginMissingExport`); no `proxy_abi_version_0_2_1`/`_0_2_0` marker, a callback with
//! another signature, or an import Kanali cannot provide → 05 (`PluginAbiMismatch`).

use wasmtime::{ExternType, FuncType, InstancePre, Linker, Module, Val, ValType};

use super::LoadError;
use super::abi::{self, Host, HostFunctions};

/// The ABI markers Kanali runs, newest first. 0.2.0 and 0.2.1 differ only in host functions
/// Kanali provides both ways.
pub const SUPPORTED_ABI: [&str; 2] = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];

/// Callbacks and their signatures in ABI 0.2.x: (name, i32 parameters, returns an i32).
const CALLBACKS: &[(&str, usize, bool)] = &[
    ("proxy_on_memory_allocate", 1, true),
    ("malloc", 1, true),
    ("proxy_on_context_create", 2, false),
    ("proxy_on_vm_start", 2, true),
    ("proxy_on_configure", 2, true),
    ("proxy_on_request_headers", 3, true),
    ("proxy_on_request_body", 3, true),
    ("proxy_on_request_trailers", 2, true),
    ("proxy_on_response_headers", 3, true),
    ("proxy_on_response_body", 3, true),
    ("proxy_on_response_trailers", 2, true),
    ("proxy_on_done", 1, true),
    ("proxy_on_log", 1, false),
    ("proxy_on_delete", 1, false),
    ("proxy_on_tick", 1, false),
    ("_initialize", 0, false),
    ("_start", 0, false),
    ("main", 2, true),
];

/// Import modules whose unknown functions get a stub that answers "unimplemented" instead of
/// failing the load: SDKs link against more than Kanali implements, and a module compiled
/// for WASI imports more of WASI than proxy-wasm names.
const STUBBED_MODULES: [&str; 3] = ["env", "wasi_snapshot_preview1", "wasi_unstable"];

/// A module that passed every check, ready to instantiate.
pub struct Compiled {
    /// Imports resolved and type-checked once, so each VM only instantiates.
    pub(crate) pre: InstancePre<Host>,
    /// Lowercase hex SHA-256 of the file, for logs.
    pub hash: String,
    /// The ABI marker it exports.
    pub abi: &'static str,
}

impl std::fmt::Debug for Compiled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compiled")
            .field("hash", &self.hash)
            .field("abi", &self.abi)
            .finish_non_exhaustive()
    }
}

/// Compiles `bytes` (the contents of `file`) and checks it against the ABI.
pub(crate) fn compile(
    host: &HostFunctions,
    file: &str,
    bytes: &[u8],
    hash: String,
) -> Result<Compiled, LoadError> {
    let module = Module::new(host.linker.engine(), bytes).map_err(|e| LoadError::Invalid {
        file: file.to_owned(),
        reason: first_line(&e.to_string()),
    })?;
    let abi = check_exports(&module, file)?;
    let mut linker = host.linker.clone();
    stub_unknown_imports(host, &mut linker, &module, file)?;
    let pre = linker
        .instantiate_pre(&module)
        .map_err(|e| LoadError::AbiMismatch {
            file: file.to_owned(),
            reason: format!("{e:#}"),
        })?;
    Ok(Compiled { pre, hash, abi })
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_owned()
}

fn describe(ty: &FuncType) -> String {
    let list = |it: &mut dyn Iterator<Item = ValType>| {
        it.map(|t| t.to_string()).collect::<Vec<_>>().join(", ")
    };
    format!(
        "({}) -> ({})",
        list(&mut ty.params()),
        list(&mut ty.results())
    )
}

/// The exports: required ones present (04), the ABI marker and the callbacks' types (05).
fn check_exports(module: &Module, file: &str) -> Result<&'static str, LoadError> {
    let export = |name: &str| module.get_export(name);
    let func = |name: &str| match export(name) {
        Some(ExternType::Func(f)) => Some(f),
        _ => None,
    };
    let mut missing = Vec::new();
    if !matches!(export("memory"), Some(ExternType::Memory(_))) {
        missing.push("memory");
    }
    if func("proxy_on_memory_allocate").is_none() && func("malloc").is_none() {
        missing.push("proxy_on_memory_allocate (or malloc)");
    }
    for name in ["proxy_on_context_create", "proxy_on_request_headers"] {
        if func(name).is_none() {
            missing.push(name);
        }
    }
    if !missing.is_empty() {
        return Err(LoadError::MissingExport {
            file: file.to_owned(),
            missing: missing.join(", "),
        });
    }
    let mismatch = |reason: String| LoadError::AbiMismatch {
        file: file.to_owned(),
        reason,
    };
    let Some(abi) = SUPPORTED_ABI.into_iter().find(|m| func(m).is_some()) else {
        let others: Vec<&str> = module
            .exports()
            .map(|e| e.name())
            .filter(|n| n.starts_with("proxy_abi_version_"))
            .collect();
        return Err(mismatch(if others.is_empty() {
            "it exports no proxy_abi_version_0_2_1 (or _0_2_0) marker".to_owned()
        } else {
            format!(
                "it is built for {}, Kanali runs proxy_abi_version_0_2_1 and _0_2_0",
                others.join(", ")
            )
        }));
    };
    for (name, params, returns) in CALLBACKS {
        let Some(ty) = func(name) else { continue };
        let ok = ty.params().len() == *params
            && ty.params().all(|p| p.is_i32())
            && ty.results().len() == usize::from(*returns)
            && ty.results().all(|r| r.is_i32());
        if !ok {
            let expected = format!(
                "({}) -> ({})",
                vec!["i32"; *params].join(", "),
                if *returns { "i32" } else { "" }
            );
            return Err(mismatch(format!(
                "{name} has type {}, the ABI says {expected}",
                describe(&ty)
            )));
        }
    }
    Ok(abi)
}

/// Gives every function import Kanali does not define, in a module it stubs, a function that
/// answers `Unimplemented` (proxy-wasm) or `ENOSYS` (WASI) without trapping. Anything else
/// Kanali cannot provide (another import module, a memory, table or global) is a 05.
fn stub_unknown_imports(
    host: &HostFunctions,
    linker: &mut Linker<Host>,
    module: &Module,
    file: &str,
) -> Result<(), LoadError> {
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let ExternType::Func(ty) = import.ty() else {
            return Err(LoadError::AbiMismatch {
                file: file.to_owned(),
                reason: format!(
                    "it imports {m}.{name}, which is not a function (Kanali provides only functions)"
                ),
            });
        };
        if host.defines(m, name) {
            continue;
        }
        if !STUBBED_MODULES.contains(&m) {
            return Err(LoadError::AbiMismatch {
                file: file.to_owned(),
                reason: format!("it imports {m}.{name}, which Kanali does not provide"),
            });
        }
        let status = if m == "env" {
            abi::status::UNIMPLEMENTED
        } else {
            abi::WASI_ENOSYS
        };
        let numeric =
            |t: &ValType| matches!(t, ValType::I32 | ValType::I64 | ValType::F32 | ValType::F64);
        if !ty.params().all(|t| numeric(&t)) || !ty.results().all(|t| numeric(&t)) {
            return Err(LoadError::AbiMismatch {
                file: file.to_owned(),
                reason: format!(
                    "it imports {m}.{name} of type {}, which Kanali does not provide",
                    describe(&ty)
                ),
            });
        }
        let results: Vec<ValType> = ty.results().collect();
        let what = format!("{m}.{name}");
        let defined = linker.func_new(m, name, ty.clone(), move |_, _, out| {
            tracing::debug!(import = %what, "a plugin called a host function Kanali does not implement");
            for (i, (r, t)) in out.iter_mut().zip(&results).enumerate() {
                *r = match t {
                    ValType::I32 if i == 0 => Val::I32(status),
                    ValType::I64 => Val::I64(0),
                    ValType::F32 => Val::F32(0),
                    ValType::F64 => Val::F64(0),
                    _ => Val::I32(0),
                };
            }
            Ok(())
        });
        if let Err(e) = defined {
            return Err(LoadError::AbiMismatch {
                file: file.to_owned(),
                reason: format!("it imports {m}.{name} of type {}: {e}", describe(&ty)),
            });
        }
    }
    Ok(())
}
