# Fixed-output derivation, flat: the hash of the output file itself;
# sha256 written in base64.
import ./lib/mk.nix {
  name = "fod-flat-sha256-base64";
  script = "echo fod-flat-sha256-base64 > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "lZFdgrWaLogvJhTbo8YN+L5NX1lPcOUt8TYZp4vZD4A=";
}
