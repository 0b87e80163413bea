//! Shared helpers for Kiln's end-to-end tests: real peers (Nix 2.8, sshd, qemu), throwaway stores.
