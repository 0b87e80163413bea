# Structured attributes with several outputs and an input derivation.
let
  mk = import ./lib/mk.nix;
  dep = mk {
    name = "structured-dep";
    script = "echo dep > $out";
  };
in
derivation {
  name = "structured-attrs-multi-output";
  __structuredAttrs = true;
  outputs = [
    "out"
    "dev"
    "man"
  ];
  builder = "/bin/bash";
  args = [
    "-c"
    "source .attrs.sh; for o in \"\${!outputs[@]}\"; do echo \"$o \${dep}\" > \"\${outputs[$o]}\"; done"
  ];
  system = builtins.currentSystem;
  inherit dep;
  deps = [
    dep
    "${dep}/sub"
  ];
}
