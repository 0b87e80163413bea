# Fixed-output derivation, flat: the hash of the output file itself;
# sha512 written in base16 (hexadecimal).
import ./lib/mk.nix {
  name = "fod-flat-sha512-base16";
  script = "echo fod-flat-sha512-base16 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha512";
  outputHash = "a0de99512ac588112b436c17b2f5c284d65afee30dfb6f3db49feafeb2606812cb84b32da8d80be803298300fe8cf32ef449b3e18dcc445cab6496e3e3b85552";
}
