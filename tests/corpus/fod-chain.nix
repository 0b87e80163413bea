# A fixed-output derivation that depends on another fixed-output derivation, and an
# ordinary derivation on top: its hash modulo uses the fixed outputs' hashes instead
# of their .drv files.
let
  mk = import ./lib/mk.nix;
  source = mk {
    name = "fod-chain-source";
    script = "echo fod-chain-source > $out";
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "1nh0kbnlsnr51bdf9kynflw6ix8q750374qma6qcm2cswis0jcl3";
  };
  fetched = mk {
    name = "fod-chain-fetched";
    script = "read line < ${source}; echo \"$line fetched\" > $out";
    outputHashAlgo = "sha1";
    outputHash = "sha1-83injqhHNZc+ndNYXoRF7WGbwHM=";
  };
in
mk {
  name = "fod-chain-consumer";
  script = "read line < ${fetched}; echo \"$line ${source}\" > $out";
}
