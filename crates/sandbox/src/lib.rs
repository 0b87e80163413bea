//! kiln-sandbox
