# Fixed-output derivation, flat: the hash of the output file itself;
# sha512 written in base64.
import ./lib/mk.nix {
  name = "fod-flat-sha512-base64";
  script = "echo fod-flat-sha512-base64 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha512";
  outputHash = "7tCMfgKhQ66cfnOEGQ7eumt/Y/wTmZHyQA6bCi+uwYHdrD4H4zXXEs1GSwzvIHSSxXa/C5nT3JAoZJXH73nGSw==";
}
