# passAsFile: large attributes reach the builder as files named by $<name>Path.
import ./lib/mk.nix {
  name = "pass-as-file";
  passAsFile = [
    "bigText"
    "otherText"
  ];
  bigText = builtins.concatStringsSep "\n" (builtins.genList (n: "line ${toString n}") 2000);
  otherText = "first line\nsecond line\n";
  script = "read first < $bigTextPath; read other < $otherTextPath; echo \"$first / $other\" > $out";
}
