# Thirty independent derivations in one attribute set, and one that depends on them all.
let
  mk = import ./lib/mk.nix;
  leaves = builtins.listToAttrs (
    builtins.genList (n: {
      name = "leaf${toString n}";
      value = mk {
        name = "wide-leaf-${toString n}";
        script = "echo leaf ${toString n} > $out";
      };
    }) 30
  );
in
leaves
// {
  all = mk {
    name = "wide-all";
    script = "echo ${toString (builtins.attrValues leaves)} > $out";
  };
}
