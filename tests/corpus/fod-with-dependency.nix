# A fixed-output derivation that reads an ordinary derivation while it builds:
# its output path depends only on the hash, but the .drv lists the input.
let
  mk = import ./lib/mk.nix;
  input = mk {
    name = "fod-input";
    script = "echo fod-with-dependency > $out";
  };
in
mk {
  name = "fod-with-dependency";
  script = "read line < ${input}; echo \"$line\" > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "sha256-wu0Gk/8HcgHkZVY4Qrt5zhoCQq3yoxLqOQ3bDq1jLI8=";
}
