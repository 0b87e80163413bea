# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# md5 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-recursive-md5-nixbase32";
  script = "echo fod-recursive-md5-nixbase32 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "md5";
  outputHash = "5zd0622pwba3xzg58skb1iaf9s";
}
