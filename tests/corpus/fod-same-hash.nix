# Two fixed-output derivations with different builders but the same name and hash:
# different .drv paths, one and the same output path.
let
  mk = import ./lib/mk.nix;
  attrs = {
    name = "fod-same-hash";
    outputHashAlgo = "sha256";
    outputHashMode = "flat";
    outputHash = "sha256-zM3EaUn611S0grFjiqAMYeH8lPvNl1K/OY61K4M8kRk=";
  };
in
{
  by-echo = mk (attrs // { script = "echo fod-same-hash > $out"; });
  by-printf = mk (attrs // { script = "printf 'fod-same-hash\\n' > $out"; });
}
