# FAILS: requires a system feature no machine has, so it cannot be built here.
import ./lib/mk.nix {
  name = "fail-required-feature";
  requiredSystemFeatures = [ "kiln-no-such-feature" ];
  script = "echo never > $out";
}
