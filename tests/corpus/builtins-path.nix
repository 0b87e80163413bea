# builtins.path: sources with a chosen name, a filter, and flat (non-recursive)
# hashing with a known hash.
let
  mk = import ./lib/mk.nix;
  filtered = builtins.path {
    path = ./src/tree;
    name = "filtered-tree";
    filter = path: type: type == "directory" || builtins.match ".*\\.log" path == null;
  };
  renamed = builtins.path {
    path = ./src/hello.txt;
    name = "renamed-hello";
  };
  flat = builtins.path {
    path = ./src/hello.txt;
    name = "flat-hello";
    recursive = false;
    sha256 = "a9bf40e6e1336076cee9209b353aa57bce86a7cb9553356b063fa5158d5113fe";
  };
in
mk {
  name = "builtins-path";
  inherit filtered renamed flat;
  script = "read a < $renamed; read b < $flat; echo \"$a $b\" > $out";
}
