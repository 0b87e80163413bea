# impureEnvVars: variables a fixed-output builder may take from the caller's
# environment (proxies, mirrors). The output does not depend on them.
import ./lib/mk.nix {
  name = "fod-impure-env-vars";
  impureEnvVars = [
    "http_proxy"
    "https_proxy"
    "KILN_TEST_MIRROR"
  ];
  script = "echo fod-impure-env-vars > $out";
  outputHashMode = "flat";
  outputHashAlgo = "sha256";
  outputHash = "sha256-Sj4cPnXa5udCZQswgfdiksHA0xjP+uVKXZ1YcG/4vHY=";
}
