# Fixed-output derivation, flat: the hash of the output file itself;
# sha512 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-flat-sha512-nixbase32";
  script = "echo fod-flat-sha512-nixbase32 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha512";
  outputHash = "38vdl94n0g5xl7sn2kc7hf8qvkyjirfgljxrkqjjis7r19pq1292zbbx8s4kfdxaykpm39n0ns4f88k53ydz9m161wpfgs10m1lgfa6";
}
