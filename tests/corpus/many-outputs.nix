# Forty outputs (o0 … o39 and out): many entries in the .drv's output list.
import ./lib/mk.nix {
  name = "many-outputs";
  outputs = [ "out" ] ++ builtins.genList (n: "o${toString n}") 40;
  script = "for o in $outputs; do eval \"echo $o > \\$$o\"; done";
}
