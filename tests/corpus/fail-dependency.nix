# FAILS: a dependency fails, so this never builds (status DependencyFailed); a
# sibling that does not depend on it builds (with --keep-going).
let
  mk = import ./lib/mk.nix;
  broken = mk {
    name = "fail-dependency-broken";
    script = "exit 3";
  };
in
{
  dependent = mk {
    name = "fail-dependency";
    script = "echo ${broken} > $out";
  };
  independent = mk {
    name = "fail-dependency-independent";
    script = "echo fine > $out";
  };
}
