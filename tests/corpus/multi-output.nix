# Three outputs, each written by the builder.
import ./lib/mk.nix {
  name = "multi-output";
  outputs = [
    "out"
    "dev"
    "lib"
  ];
  script = "echo out > $out; echo dev > $dev; echo lib > $lib";
}
