# Control characters that the .drv format writes raw (only \n \r \t are escaped),
# made through JSON escapes since Nix strings have no \u syntax.
let
  controls = builtins.fromJSON ''"\u0001\u0002\u0007\b\f\u000b\u001b[0m\u001f\u007f"'';
in
import ./lib/mk.nix {
  name = "control-chars";
  inherit controls;
  bell = builtins.fromJSON ''"ring\u0007ring"'';
  script = "echo control > $out";
}
