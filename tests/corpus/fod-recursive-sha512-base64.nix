# Fixed-output derivation, recursive: the hash of the output's NAR serialisation;
# sha512 written in base64.
import ./lib/mk.nix {
  name = "fod-recursive-sha512-base64";
  script = "echo fod-recursive-sha512-base64 > $out";
  outputHashMode = "recursive";
  outputHashAlgo = "sha512";
  outputHash = "1zC1vX7wcmxzY+mDp8Gx8Nj2I/IbzHXZ4lTB/K6zb7EKSjyqJkVDy0wbWsoqS3cGgJS0OkKvjwXkInQlDi1uEw==";
}
