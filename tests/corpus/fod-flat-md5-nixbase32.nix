# Fixed-output derivation, flat: the hash of the output file itself;
# md5 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-flat-md5-nixbase32";
  script = "echo fod-flat-md5-nixbase32 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "md5";
  outputHash = "565j6iap8h0jyiinzgn98frkxv";
}
