# The corpus's one helper: a derivation built by `/bin/sh -c SCRIPT`.
#
# Builders use shell builtins only (echo, printf, read, test, loops), so they
# build inside a sandbox that exposes nothing but /bin/sh and its libraries.
# Any attribute may be overridden, including builder and system.
{ name, script, ... }@attrs:
derivation (
  {
    builder = "/bin/sh";
    system = builtins.currentSystem;
  }
  // builtins.removeAttrs attrs [ "script" ]
  // {
    args = [ "-c" script ];
  }
)
