//! Benchmarks, run by `cargo xtask bench NAME`.
