# The builder is itself a store path (a script from toFile) run through args, and a
# second derivation whose builder is a derivation's output.
let
  script = builtins.toFile "build.sh" ''
    echo "built by a store script" > $out
  '';
  runner = derivation {
    name = "runner";
    builder = "/bin/sh";
    args = [ "-c" "echo 'echo run > $out' > $out" ];
    system = builtins.currentSystem;
  };
in
{
  scripted = derivation {
    name = "builder-from-store";
    builder = "/bin/sh";
    args = [ script ];
    system = builtins.currentSystem;
  };
  runsOutput = derivation {
    name = "builder-is-output";
    builder = "/bin/sh";
    args = [ "${runner}" ];
    system = builtins.currentSystem;
  };
}
