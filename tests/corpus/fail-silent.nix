# FAILS: prints one line, then stays silent for 60 seconds and exits 1. Built with
# `max-silent-time` below 60 (e.g. --option max-silent-time 2) it fails as timed out.
import ./lib/mk.nix {
  name = "fail-silent";
  builder = "/bin/bash";
  script = "echo 'going quiet'; while [ $SECONDS -lt 60 ]; do :; done; exit 1";
}
