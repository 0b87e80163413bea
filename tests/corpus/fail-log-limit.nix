# FAILS: prints about 2 MB to its log and exits 1. Built with `max-build-log-size`
# below that (e.g. --option max-build-log-size 100000) it fails for the log limit.
import ./lib/mk.nix {
  name = "fail-log-limit";
  script = "i=0; while [ $i -lt 40000 ]; do echo \"log line $i: padding padding padding\"; i=$((i+1)); done; exit 1";
}
