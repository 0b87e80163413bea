# Very long strings: a 200 KB environment value, a 64 KB single line, and a long
# argument, as big packages' .drv files have. The long value reaches the builder as a
# file (passAsFile): one environment string may not exceed 128 KiB on Linux.
let
  repeat = n: s: builtins.concatStringsSep "" (builtins.genList (_: s) n);
in
import ./lib/mk.nix {
  name = "long-strings";
  passAsFile = [ "longValue" ];
  longValue = builtins.concatStringsSep "\n" (
    builtins.genList (n: "line ${toString n}: ${repeat 8 "abcdefgh"}") 2600
  );
  longLine = repeat 8192 "01234567";
  script = "echo ${builtins.substring 0 1000 (repeat 200 "x\\\"y")} > $out";
}
