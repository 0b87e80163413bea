# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha512 written in Nix's base-32.
import ./lib/mk.nix {
  name = "fod-recursive-sha512-nixbase32";
  script = "echo fod-recursive-sha512-nixbase32 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha512";
  outputHash = "11908302ij6vlzi9b883jasinjlnnv31phr3g7wjzfglb68lncl4r4gsvx42l43708lajxwmhmswwdncjxq81zz89ybzcn82mi2z9mm";
}
