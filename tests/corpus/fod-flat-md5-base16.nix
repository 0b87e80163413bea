# Fixed-output derivation, flat: the hash of the output file itself;
# md5 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-flat-md5-base16";
  script = "echo fod-flat-md5-base16 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "md5";
  outputHash = "2d6dd16cec9402d7607dc64a4007e390";
}
