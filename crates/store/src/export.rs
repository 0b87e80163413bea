//! The `nix-store --export` / `--import` stream format.
