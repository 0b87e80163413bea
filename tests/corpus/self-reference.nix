# The output mentions its own store path: a self-reference for reference scanning.
import ./lib/mk.nix {
  name = "self-reference";
  script = "echo \"I am $out\" > $out";
}
