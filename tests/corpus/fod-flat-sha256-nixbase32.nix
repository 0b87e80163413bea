# Fixed-output derivation, flat: the hash of the output file itself;
# sha256 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-flat-sha256-nixbase32";
  script = "echo fod-flat-sha256-nixbase32 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "057w4gizvrpvmzqf2q9flg2chyl0ww29vw0yxzrxs7yapz4vb0f9";
}
