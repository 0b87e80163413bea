# Fixed-output derivation, flat: the hash of the output file itself;
# sha1 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-flat-sha1-nixbase32";
  script = "echo fod-flat-sha1-nixbase32 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha1";
  outputHash = "8pxajzhr5rhgv7adg5wpl83ig9dznl2b";
}
