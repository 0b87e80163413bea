# The longest name a derivation may have: the .drv's store path name is
# "<name>.drv", and a store path name is at most 211 bytes.
let
  name = builtins.substring 0 207 (
    builtins.concatStringsSep "" (builtins.genList (n: "long-name-${toString n}-") 30)
  );
in
import ./lib/mk.nix {
  inherit name;
  script = "echo long > $out";
}
