# Text files that refer to other text files, to a source file, and to a .drv file:
# their store paths are text paths whose fingerprint includes those references.
let
  mk = import ./lib/mk.nix;
  greeting = builtins.toFile "greeting.txt" "hello\n";
  config = builtins.toFile "config.txt" ''
    greeting=${greeting}
    source=${./src/hello.txt}
  '';
  other = mk {
    name = "tofile-referenced-drv";
    script = "echo other > $out";
  };
  # A text file may name a .drv but not a derivation's outputs.
  manifest = builtins.toFile "manifest.txt" ''
    config=${config}
    drv=${builtins.unsafeDiscardOutputDependency other.drvPath}
  '';
in
mk {
  name = "tofile-references";
  script = "read first < ${manifest}; echo \"$first\" > $out";
}
