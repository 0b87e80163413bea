# Several derivations that share inputs, as an attribute set of derivations.
let
  mk = import ./lib/mk.nix;
  common = mk {
    name = "shared-common";
    script = "echo common > $out";
  };
  helper = mk {
    name = "shared-helper";
    script = "echo helper ${common} > $out";
  };
in
{
  inherit common helper;
  first = mk {
    name = "shared-first";
    script = "echo first ${common} ${helper} > $out";
  };
  second = mk {
    name = "shared-second";
    script = "echo second ${common} > $out";
  };
}
