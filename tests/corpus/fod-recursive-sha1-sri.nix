# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha1 written in SRI form, algorithm taken from the hash.
import ./lib/mk.nix {
  name = "fod-recursive-sha1-sri";
  script = "echo fod-recursive-sha1-sri > $out";
  outputHashMode = "recursive";
  outputHash = "sha1-tZK+Ym9UVSSDvyw6ZYzeblJG9og=";
}
