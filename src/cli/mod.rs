//! The `ferry` and `kubectl ferry` command lines.

pub mod crds;
