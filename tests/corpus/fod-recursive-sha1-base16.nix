# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha1 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-recursive-sha1-base16";
  script = "echo fod-recursive-sha1-base16 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha1";
  outputHash = "f0f9f62940ae9bfd8c5c4ed43e28d79439dcd61c";
}
