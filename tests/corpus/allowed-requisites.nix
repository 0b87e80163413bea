# allowedRequisites: the whole closure of the output must be within the list,
# which may name the output itself through "out".
let
  mk = import ./lib/mk.nix;
  base = mk {
    name = "requisites-base";
    script = "echo base > $out";
  };
  middle = mk {
    name = "requisites-middle";
    script = "echo ${base} > $out";
  };
in
mk {
  name = "allowed-requisites";
  allowedRequisites = [
    "out"
    middle
    base
  ];
  script = "echo ${middle} > $out";
}
