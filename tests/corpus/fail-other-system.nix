# FAILS: a derivation for another platform than this machine's.
import ./lib/mk.nix {
  name = "fail-other-system";
  system = if builtins.currentSystem == "aarch64-linux" then "x86_64-linux" else "aarch64-linux";
  script = "echo never > $out";
}
