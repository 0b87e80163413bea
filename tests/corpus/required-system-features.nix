# requiredSystemFeatures: only machines with these features may build it. Both are in
# Nix's default system-features, so it builds locally.
import ./lib/mk.nix {
  name = "required-system-features";
  requiredSystemFeatures = [
    "big-parallel"
    "benchmark"
  ];
  script = "echo needs features > $out";
}
