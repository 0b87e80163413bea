# builtins.toFile: a text file added to the store at evaluation time, used as a source.
let
  script = builtins.toFile "tofile-text-builder.sh" ''
    echo "built by a script from toFile" > "$out"
  '';
in
derivation {
  name = "tofile-text";
  builder = "/bin/sh";
  args = [ script ];
  system = builtins.currentSystem;
}
