# Fixed-output derivation, flat: the hash of the output file itself;
# sha1 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-flat-sha1-base16";
  script = "echo fod-flat-sha1-base16 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha1";
  outputHash = "0e4ae7e27172c554beb91a0410bd8e5dc1044d6e";
}
