# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha256 written in base64.
import ./lib/mk.nix {
  name = "fod-recursive-sha256-base64";
  script = "echo fod-recursive-sha256-base64 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  outputHash = "mfEE2iwTVQ9ImByC1SS4z8dWtaEl0+NvmJyg8Bn4M8w=";
}
