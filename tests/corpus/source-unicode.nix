# A source file with a non-ASCII file name (only its store name must be ASCII).
import ./lib/mk.nix {
  name = "source-unicode";
  src = builtins.path {
    path = ./src + "/unicode-名前.txt";
    name = "unicode-source.txt";
  };
  script = "read line < $src; echo \"$line\" > $out";
}
