# Outputs declared out of alphabetical order, "out" not first: the first one ("lib")
# is the default output, while the .drv lists them sorted.
import ./lib/mk.nix {
  name = "multi-output-order";
  outputs = [
    "lib"
    "out"
    "bin"
    "dev"
  ];
  script = "for o in $outputs; do eval \"echo $o > \\$$o\"; done";
}
