# Fixed-output derivation, flat: the hash of the output file itself;
# sha256 written in SRI form, algorithm taken from the hash.
import ./lib/mk.nix {
  name = "fod-flat-sha256-sri";
  script = "echo fod-flat-sha256-sri > $out";
  outputHashMode = "flat";
  outputHash = "sha256-uYv6zYMOGUqL2vIEfx/FjrGaQebPVaOZflgem90pou0=";
}
