# FAILS: a fixed-output derivation whose output does not have the declared hash
# (it declares the hash of the empty file).
import ./lib/mk.nix {
  name = "fail-fod-hash-mismatch";
  script = "echo not empty > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "sha256-47DEQpj8HBSa+/TImW+5JFeuQeRkm5NMpJWZG3hSuFU=";
}
