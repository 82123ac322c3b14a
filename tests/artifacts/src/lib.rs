//! The example and test guests, compiled to `wasm32-wasip1`, for the host's
//! tests (the wasmtime `test-programs-artifacts` pattern).
//!
//! The build script compiles every guest crate with a nested
//! `cargo build --release --target wasm32-wasip1` into
//! `target/wasm-artifacts/` and generates a constant per guest holding the
//! absolute path of its `.wasm`, plus [`ALL`]. Depend on this crate as a
//! dev-dependency; the guests rebuild when the SDK, an example, a test
//! program or the protos change.
//!
//! ```no_run
//! let bytes = std::fs::read(stoker_test_artifacts::WORDCOUNT).unwrap();
//! assert_eq!(bytes, stoker_test_artifacts::read("wordcount"));
//! for (name, path) in stoker_test_artifacts::ALL {
//!     println!("{name}: {path}");
//! }
//! ```
//!
//! Guests: `wordcount`, `primes`, `sort` (from `examples/`) and `misbehave`
//! (from `tests/programs/`, whose payloads choose a misbehaviour).

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));

/// The path of guest `name`, `None` when there is no such guest.
pub fn path(name: &str) -> Option<&'static str> {
    ALL.iter()
        .find(|(guest, _)| *guest == name)
        .map(|(_, path)| *path)
}

/// The bytes of guest `name`.
///
/// # Panics
/// When there is no such guest or its file cannot be read; both mean a
/// broken test setup.
pub fn read(name: &str) -> Vec<u8> {
    let path = path(name).unwrap_or_else(|| {
        let names: Vec<&str> = ALL.iter().map(|(guest, _)| *guest).collect();
        panic!("no guest named {name:?}; the guests are {names:?}")
    });
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The reference answer of the `wordcount` example, computed here
/// independently of the guest: words are maximal alphanumeric runs,
/// lowercased; the 20 most frequent by count descending, then word
/// ascending.
pub fn wordcount_top20(text: &str) -> Vec<(String, u64)> {
    let mut counts: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    let mut all: Vec<_> = counts.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(20);
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_guest_is_a_wasm_module() {
        assert_eq!(super::ALL.len(), 4);
        for (name, _) in super::ALL {
            let bytes = super::read(name);
            assert_eq!(&bytes[..4], b"\0asm", "{name}");
        }
        assert_eq!(super::path("primes"), Some(super::PRIMES));
        assert_eq!(super::path("nope"), None);
    }
}
