# With structured attributes, reference checks are given per output in outputChecks.
let
  mk = import ./lib/mk.nix;
  allowed = mk {
    name = "checks-allowed";
    script = "echo allowed > $out";
  };
  forbidden = mk {
    name = "checks-forbidden";
    script = "echo forbidden > $out";
  };
in
derivation {
  name = "structured-attrs-output-checks";
  __structuredAttrs = true;
  outputs = [
    "out"
    "bin"
  ];
  builder = "/bin/bash";
  args = [
    "-c"
    "source .attrs.sh; echo \${allowed} > \${outputs[out]}; echo bin > \${outputs[bin]}"
  ];
  system = builtins.currentSystem;
  inherit allowed forbidden;
  outputChecks = {
    out = {
      allowedReferences = [ allowed ];
      disallowedRequisites = [ forbidden ];
      maxSize = 4096;
      maxClosureSize = 65536;
    };
    bin = {
      # A path's requisites include itself, named here by its output name.
      allowedRequisites = [ "bin" ];
      ignoreSelfRefs = true;
    };
  };
}
