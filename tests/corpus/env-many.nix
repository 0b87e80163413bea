# Three hundred environment variables, whose names sort differently as strings than
# as numbers (var10 before var2).
import ./lib/mk.nix (
  builtins.listToAttrs (
    builtins.genList (n: {
      name = "var${toString n}";
      value = "value ${toString n}";
    }) 300
  )
  // {
    name = "env-many";
    A_UPPER = "upper";
    _underscore = "under";
    "with-dash" = "dash";
    script = "echo $var299 > $out";
  }
)
