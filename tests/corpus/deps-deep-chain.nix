# Twelve derivations in a line, each referring to the previous one's output.
let
  mk = import ./lib/mk.nix;
  step =
    previous: n:
    mk {
      name = "chain-${toString n}";
      script = "echo ${toString n} ${if previous == null then "start" else previous} > $out";
    };
in
builtins.foldl' step null (builtins.genList (n: n) 12)
