# The name the builder is called by: Nix passes the builder's base name as
# `argv[0]`, which a shell sees as `$0` (and prints in its own messages).
{
  shell = derivation {
    name = "builder-argv0-shell";
    builder = "/bin/sh";
    args = [ "-c" "echo \"$0\" > $out" ];
    system = builtins.currentSystem;
  };
  bash = derivation {
    name = "builder-argv0-bash";
    builder = "/bin/bash";
    args = [ "-c" "echo \"$0 $BASH_ARGV0\" > $out" ];
    system = builtins.currentSystem;
  };
}
