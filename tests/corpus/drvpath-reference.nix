# Refers to another derivation's .drv file itself (its drvPath): every output of
# that derivation becomes an input, and the .drv path appears in the environment.
let
  mk = import ./lib/mk.nix;
  multi = mk {
    name = "drvpath-target";
    outputs = [
      "out"
      "bin"
    ];
    script = "echo out > $out; echo bin > $bin";
  };
in
mk {
  name = "drvpath-reference";
  targetDrv = multi.drvPath;
  script = "echo $targetDrv > $out";
}
