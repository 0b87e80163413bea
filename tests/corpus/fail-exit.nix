# FAILS: the builder exits with status 1 after printing a line to its log.
import ./lib/mk.nix {
  name = "fail-exit";
  script = "echo 'about to fail' >&2; exit 1";
}
