# allowedReferences: the output may refer only to the listed paths (here, one input,
# and in a second derivation, nothing at all).
let
  mk = import ./lib/mk.nix;
  dep = mk {
    name = "allowed-dep";
    script = "echo dep > $out";
  };
in
{
  one = mk {
    name = "allowed-references-one";
    allowedReferences = [ dep ];
    script = "echo ${dep} > $out";
  };
  none = mk {
    name = "allowed-references-none";
    allowedReferences = [ ];
    script = "echo no references > $out";
  };
}
