# FAILS: runs busy for 60 seconds, then exits 1. Built with `timeout` set below
# 60 (e.g. --option timeout 2) it fails as timed out.
import ./lib/mk.nix {
  name = "fail-timeout";
  builder = "/bin/bash";
  script = "echo working; while [ $SECONDS -lt 60 ]; do :; done; exit 1";
}
