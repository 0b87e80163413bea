# A local file named by a path literal is copied to the store as a source and
# becomes an input source of the derivation.
import ./lib/mk.nix {
  name = "source-file";
  src = ./src/hello.txt;
  script = "read line < $src; echo \"$line\" > $out";
}
