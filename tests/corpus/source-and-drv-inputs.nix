# Inputs of every kind at once: sources, a text file, and outputs of derivations.
let
  mk = import ./lib/mk.nix;
  dep = mk {
    name = "mixed-dep";
    outputs = [
      "out"
      "dev"
    ];
    script = "echo out > $out; echo dev > $dev";
  };
in
mk {
  name = "source-and-drv-inputs";
  source = ./src/hello.txt;
  tree = ./src/tree;
  text = builtins.toFile "mixed-text" "text input\n";
  script = "echo ${dep} ${dep.dev} > $out";
}
