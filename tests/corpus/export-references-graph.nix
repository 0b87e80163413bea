# exportReferencesGraph: the builder gets the closure of the named paths in a file,
# in the format of `nix-store --register-validity` (path, deriver, references).
let
  mk = import ./lib/mk.nix;
  base = mk {
    name = "erg-base";
    script = "echo base > $out";
  };
  middle = mk {
    name = "erg-middle";
    script = "echo ${base} > $out";
  };
in
mk {
  name = "export-references-graph";
  exportReferencesGraph = [
    "closure-of-middle"
    middle
    "closure-of-source"
    ./src/hello.txt
  ];
  script = "while read line; do echo \"$line\"; done < closure-of-middle > $out";
}
