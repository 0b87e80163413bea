# The smallest derivation: one output, no inputs, written out in full without the helper.
derivation {
  name = "simple";
  builder = "/bin/sh";
  args = [ "-c" "echo simple > $out" ];
  system = builtins.currentSystem;
}
