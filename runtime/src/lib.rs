//! Stoker runtime.
pub mod sandbox;
