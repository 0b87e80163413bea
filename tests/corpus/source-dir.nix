# A local directory as a source: regular, executable and empty files, symlinks and
# a subdirectory, serialised as a NAR to compute its path.
import ./lib/mk.nix {
  name = "source-dir";
  src = ./src/tree;
  script = "read line < $src/readme.txt; echo \"$line\" > $out";
}
