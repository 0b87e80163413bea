# A thousand builder arguments.
derivation {
  name = "args-many";
  builder = "/bin/sh";
  args = [
    "-c"
    "echo $# > $out"
    "sh"
  ] ++ builtins.genList (n: "argument-${toString n}") 1000;
  system = builtins.currentSystem;
}
