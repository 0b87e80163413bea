# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha512 written in SRI form, algorithm taken from the hash.
import ./lib/mk.nix {
  name = "fod-recursive-sha512-sri";
  script = "echo fod-recursive-sha512-sri > $out";
  outputHashMode = "recursive";
  outputHash = "sha512-Ak1Ves3eVBDY3Fi7O3c4u4SJX/5dY2YhWgMQm4FipVePuNbiSrZT8+laprAPnfW7D8h4GlxkWdpkhDfaLYCBAg==";
}
