# allowSubstitutes = false: never fetch the output from a binary cache; and its
# opposite spelled out, which must mean the same as leaving it out.
let
  mk = import ./lib/mk.nix;
in
{
  never = mk {
    name = "no-substitutes";
    allowSubstitutes = false;
    preferLocalBuild = true;
    script = "echo no substitutes > $out";
  };
  explicit = mk {
    name = "explicit-substitutes";
    allowSubstitutes = true;
    script = "echo substitutes allowed > $out";
  };
}
