//! Loading task modules: validation against the guest ABI, compilation once
//! per module hash, and the on-disk cache of compiled code.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, ExternType, InstancePre, Linker, Module, ValType};

use super::error::SandboxError;
use super::host::{HostState, STOKER_IMPORTS};

/// The ABI version this host implements.
pub const ABI_VERSION: u32 = stoker_proto::guest::ABI_VERSION;
const ABI_MARKER_PREFIX: &str = "stoker_abi_v";
const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// A validated, compiled module, ready to instantiate.
pub struct TaskModule {
    /// Hex sha256 of the module bytes: the module's identity.
    pub hash: String,
    pub(crate) pre: InstancePre<HostState>,
    pub(crate) exports: Exports,
}

impl std::fmt::Debug for TaskModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskModule")
            .field("hash", &self.hash)
            .finish()
    }
}

/// Which optional exports the module has.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exports {
    pub finish: bool,
    pub revert: bool,
    pub initialize: bool,
}

/// Hex sha256 of module bytes.
pub fn module_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Compiled modules by hash, in memory and (optionally) on disk.
pub(crate) struct ModuleCache {
    dir: Option<PathBuf>,
    /// Distinguishes code compiled by engines with different settings or
    /// wasmtime versions; part of every cache file name.
    engine_tag: String,
    loaded: Mutex<HashMap<String, Arc<TaskModule>>>,
}

impl ModuleCache {
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ModuleCache {
            dir,
            engine_tag: format!("{:016x}", hasher.finish()),
            loaded: Mutex::default(),
        })
    }

    pub(crate) fn get(&self, hash: &str) -> Option<Arc<TaskModule>> {
        self.loaded.lock().expect("cache lock").get(hash).cloned()
    }

    pub(crate) fn insert(&self, module: Arc<TaskModule>) {
        self.loaded
            .lock()
            .expect("cache lock")
            .insert(module.hash.clone(), module);
    }

    fn file(&self, hash: &str) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(dir.join(format!("{hash}-{}.cwasm", self.engine_tag)))
    }

    /// Compiles `bytes`, or loads the code compiled earlier from disk.
    pub(crate) fn compile(
        &self,
        engine: &Engine,
        hash: &str,
        bytes: &[u8],
    ) -> Result<Module, SandboxError> {
        if let Some(path) = self.file(hash) {
            match load_compiled(engine, &path) {
                Ok(Some(module)) => return Ok(module),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable compiled module")
                }
            }
        }
        let module = compile(engine, bytes)?;
        if let Some(path) = self.file(hash) {
            if let Err(e) = store_compiled(&module, &path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled module");
            }
        }
        Ok(module)
    }
}

fn compile(engine: &Engine, bytes: &[u8]) -> Result<Module, SandboxError> {
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(SandboxError::invalid_module(
            "not a WebAssembly module (missing the \\0asm header)",
        ));
    }
    Module::from_binary(engine, bytes)
        .map_err(|e| SandboxError::invalid_module(format!("module does not compile: {e:#}")))
}

/// A cache file is `sha256(code) ++ code`: the checksum catches a corrupted
/// or truncated file, which deserialization alone would not.
fn load_compiled(engine: &Engine, path: &Path) -> Result<Option<Module>, String> {
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if data.len() < 32 || Sha256::digest(&data[32..]).as_slice() != &data[..32] {
        return Err("checksum mismatch".into());
    }
    // SAFETY: the bytes were produced by `Module::serialize` of an engine with
    // the same compatibility hash (it is in the file name), were written by
    // this process family into its own cache directory, and their checksum
    // matches, so they are the exact artifact wasmtime produced.
    let module =
        unsafe { Module::deserialize(engine, &data[32..]) }.map_err(|e| format!("{e:#}"))?;
    Ok(Some(module))
}

fn store_compiled(module: &Module, path: &Path) -> Result<(), String> {
    let code = module.serialize().map_err(|e| format!("{e:#}"))?;
    let mut data = Sha256::digest(&code).to_vec();
    data.extend_from_slice(&code);
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &data).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

/// Checks a compiled module against the guest ABI and links it.
///
/// # Errors
/// `abi` for a wrong ABI version; `invalid_module` naming every missing or
/// mistyped export and every unknown import.
pub(crate) fn validate_and_link(
    linker: &Linker<HostState>,
    module: &Module,
    hash: String,
) -> Result<TaskModule, SandboxError> {
    check_abi_version(module)?;
    let mut problems = Vec::new();
    check_imports(module, &mut problems);
    let exports = check_exports(module, &mut problems);
    if !problems.is_empty() {
        return Err(SandboxError::invalid_module(problems.join("; ")));
    }
    let pre = linker
        .instantiate_pre(module)
        .map_err(|e| SandboxError::invalid_module(format!("cannot link module: {e:#}")))?;
    Ok(TaskModule { hash, pre, exports })
}

fn check_abi_version(module: &Module) -> Result<(), SandboxError> {
    let versions: Vec<&str> = module
        .exports()
        .filter_map(|e| e.name().strip_prefix(ABI_MARKER_PREFIX))
        .collect();
    let ours = ABI_VERSION.to_string();
    if versions.is_empty() || versions.contains(&ours.as_str()) {
        // A missing marker is reported with the other missing exports.
        return Ok(());
    }
    Err(SandboxError::abi(format!(
        "module targets stoker guest ABI v{}, this host supports v{ABI_VERSION}",
        versions.join(", v")
    )))
}

fn check_imports(module: &Module, problems: &mut Vec<String>) {
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        let known = match m {
            "stoker" => STOKER_IMPORTS.contains(&name),
            // Resolved by the linker, which names an unknown one.
            WASI_MODULE => true,
            _ => false,
        };
        if !known {
            problems.push(format!(
                "unknown import `{m}::{name}` (a module may import only from `stoker` and `{WASI_MODULE}`)"
            ));
        }
    }
}

fn check_exports(module: &Module, problems: &mut Vec<String>) -> Exports {
    use ValType::{I32, I64};
    let entry: (&[ValType], &[ValType]) = (&[I32, I32], &[I64]);
    let func = |name: &str,
                want: Option<(&[ValType], &[ValType])>,
                required: bool,
                problems: &mut Vec<String>| {
        match module.get_export(name) {
            Some(ExternType::Func(f)) => {
                if let Some((params, results)) = want {
                    let ok = f
                        .params()
                        .map(|p| p.to_string())
                        .eq(params.iter().map(|p| p.to_string()))
                        && f.results()
                            .map(|r| r.to_string())
                            .eq(results.iter().map(|r| r.to_string()));
                    if !ok {
                        problems.push(format!(
                            "export `{name}` has type {f}, expected (func (param {}) (result {}))",
                            join_types(params),
                            join_types(results)
                        ));
                    }
                }
                true
            }
            Some(other) => {
                problems.push(format!(
                    "export `{name}` must be a function, found {other:?}"
                ));
                false
            }
            None => {
                if required {
                    problems.push(format!("missing export `{name}`"));
                }
                false
            }
        }
    };
    match module.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() => {}
        Some(ExternType::Memory(_)) => {
            problems.push("export `memory` must be a 32-bit memory".into())
        }
        Some(_) => problems.push("export `memory` must be a memory".into()),
        None => problems.push("missing export `memory`".into()),
    }
    func(
        &format!("{ABI_MARKER_PREFIX}{ABI_VERSION}"),
        None,
        true,
        problems,
    );
    func("stoker_alloc", Some((&[I32], &[I32])), true, problems);
    func("stoker_plan", Some(entry), true, problems);
    func("stoker_run", Some(entry), true, problems);
    // Optional and never called by this host, but a mistyped one is a bug.
    func("stoker_free", Some((&[I32, I32], &[])), false, problems);
    Exports {
        finish: func("stoker_finish", Some(entry), false, problems),
        revert: func("stoker_revert", Some(entry), false, problems),
        initialize: func("_initialize", Some((&[], &[])), false, problems),
    }
}

fn join_types(types: &[ValType]) -> String {
    types
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}
