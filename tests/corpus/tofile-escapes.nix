# A toFile text with every character Nix strings can hold, and the derivation that uses it.
let
  weird = builtins.toFile "weird-text" "tab\tcr\rnewline\nquote\"backslash\\dollar$ brace\${x} unicode: λ ✓ 🦀\n";
  empty = builtins.toFile "empty-text" "";
in
import ./lib/mk.nix {
  name = "tofile-escapes";
  script = "echo ${weird} ${empty} > $out";
}
