//! kiln-derivation
