# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha256 written in SRI form, algorithm taken from the hash.
import ./lib/mk.nix {
  name = "fod-recursive-sha256-sri";
  script = "echo fod-recursive-sha256-sri > $out";
  outputHashMode = "recursive";
  outputHash = "sha256-GlSH+gQ+Nm7JPEVgLCnVzTjRThU148NPW7E8XW6Ffnw=";
}
