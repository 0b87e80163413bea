# A diamond: two middle derivations share one base, and the top depends on both.
let
  mk = import ./lib/mk.nix;
  base = mk {
    name = "diamond-base";
    script = "echo base > $out";
  };
  left = mk {
    name = "diamond-left";
    script = "echo left ${base} > $out";
  };
  right = mk {
    name = "diamond-right";
    script = "echo right ${base} > $out";
  };
in
mk {
  name = "diamond-top";
  script = "echo ${left} ${right} > $out";
}
