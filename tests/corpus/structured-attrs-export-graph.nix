# exportReferencesGraph with structured attributes: the closure is written into
# .attrs.json under the given key.
let
  mk = import ./lib/mk.nix;
  base = mk {
    name = "graph-base";
    script = "echo base > $out";
  };
  top = mk {
    name = "graph-top";
    script = "echo ${base} > $out";
  };
in
derivation {
  name = "structured-attrs-export-graph";
  __structuredAttrs = true;
  builder = "/bin/bash";
  args = [
    "-c"
    "source .attrs.sh; echo graph > \${outputs[out]}"
  ];
  system = builtins.currentSystem;
  exportReferencesGraph = {
    closure = [ top ];
    single = base;
  };
}
