# FAILS: the output refers to an input that disallowedReferences forbids, and a
# second one refers to a path outside its allowedReferences.
let
  mk = import ./lib/mk.nix;
  forbidden = mk {
    name = "fail-forbidden-dep";
    script = "echo forbidden > $out";
  };
in
{
  disallowed = mk {
    name = "fail-disallowed-reference";
    disallowedReferences = [ forbidden ];
    script = "echo ${forbidden} > $out";
  };
  notAllowed = mk {
    name = "fail-not-allowed-reference";
    allowedReferences = [ ];
    script = "echo ${forbidden} > $out";
  };
}
