//! kiln-ci: the CI coordinator's command line.

fn main() {}
