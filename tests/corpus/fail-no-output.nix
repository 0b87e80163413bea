# FAILS: the builder succeeds but never creates $out.
import ./lib/mk.nix {
  name = "fail-no-output";
  script = "echo 'forgot the output'";
}
