# Fixed-output derivation, flat: the hash of the output file itself;
# sha512 written in SRI form, algorithm taken from the hash.
import ./lib/mk.nix {
  name = "fod-flat-sha512-sri";
  script = "echo fod-flat-sha512-sri > $out";
  outputHashMode = "flat";
  outputHash = "sha512-CMBuEwAckXzWr5EayEJShZD5KLqS+LSMA1vVzWyo95lG6Cc8PwtbWv+3EphO3ciVJZi5VOmE6ruqu3dsxb6MJQ==";
}
