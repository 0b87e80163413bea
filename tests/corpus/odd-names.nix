# Names using every character a store path name may hold: letters, digits and
# + - . _ ? = (not starting with a dot).
let
  mk = import ./lib/mk.nix;
  named = name: mk {
    inherit name;
    script = "echo odd > $out";
  };
in
{
  plus = named "c++-runtime";
  question = named "what?=is_this";
  dots = named "a.b.c.d";
  underscore = named "_leading_underscore";
  dash = named "-leading-dash";
  equals = named "key=value";
  digits = named "0123456789";
  single = named "x";
  mixed = named "A-z_0.9+?=";
  version = named "hello-2.12.1";
  prerelease = named "tool-1.0rc2+git.20240101";
}
