# A fixed-output derivation with structured attributes: outputHash* are still read
# from the attribute set.
derivation {
  name = "structured-attrs-fod";
  __structuredAttrs = true;
  builder = "/bin/bash";
  args = [
    "-c"
    "source .attrs.sh; echo structured-attrs-fod > \${outputs[out]}"
  ];
  system = builtins.currentSystem;
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  outputHash = "sha256-rvF1q2G36RxP8kyTeQSqr9MFRhnseW6Mn2SSYP/QUY4=";
  impureEnvVars = [ "http_proxy" ];
  meta = {
    description = "kept in __json";
    priority = 5;
  };
}
