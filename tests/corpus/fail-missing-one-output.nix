# FAILS: of three outputs, the builder creates only two (no $doc).
import ./lib/mk.nix {
  name = "fail-missing-one-output";
  outputs = [
    "out"
    "dev"
    "doc"
  ];
  script = "echo out > $out; echo dev > $dev";
}
