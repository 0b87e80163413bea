# Fixed-output derivation, flat: the hash of the output file itself;
# sha1 written in base64.
import ./lib/mk.nix {
  name = "fod-flat-sha1-base64";
  script = "echo fod-flat-sha1-base64 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha1";
  outputHash = "hP5I0Y4OOsH/IGVkHL9fFEktoJw=";
}
