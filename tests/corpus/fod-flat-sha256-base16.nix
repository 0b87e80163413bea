# Fixed-output derivation, flat: the hash of the output file itself;
# sha256 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-flat-sha256-base16";
  script = "echo fod-flat-sha256-base16 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "92a8ce0b19f0745add85c333b1be63e88fae0a687ae282f6127d4a873e9c1d9a";
}
