# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha256 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-recursive-sha256-nixbase32";
  script = "echo fod-recursive-sha256-nixbase32 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  outputHash = "1dli8nsn8hm0y13j2f99ivmx08iwn3cwb65idqy0ax5hsc9xym7n";
}
