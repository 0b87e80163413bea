# Depends on particular outputs (dev and lib, not out) of a multi-output derivation,
# so the .drv's input derivations name only those outputs.
let
  mk = import ./lib/mk.nix;
  multi = mk {
    name = "split-package";
    outputs = [
      "out"
      "dev"
      "lib"
      "doc"
    ];
    script = "echo out > $out; echo dev > $dev; echo lib > $lib; echo doc > $doc";
  };
in
{
  uses-dev-and-lib = mk {
    name = "uses-dev-and-lib";
    script = "read a < ${multi.dev}; read b < ${multi.lib}; echo \"$a $b\" > $out";
  };
  uses-doc = mk {
    name = "uses-doc";
    script = "echo ${multi.doc} > $out";
  };
}
