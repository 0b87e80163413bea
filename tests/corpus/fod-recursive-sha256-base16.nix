# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha256 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-recursive-sha256-base16";
  script = "echo fod-recursive-sha256-base16 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  outputHash = "b565ccc5912c52c0f4d649a6490c310fe193f820a75fb080acc9bf6a7f270630";
}
