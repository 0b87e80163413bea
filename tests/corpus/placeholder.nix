# builtins.placeholder stands in for output paths in the environment.
import ./lib/mk.nix {
  name = "placeholder";
  outputs = [
    "out"
    "dev"
  ];
  devPath = builtins.placeholder "dev";
  outPath2 = "${builtins.placeholder "out"}/share";
  script = "echo $devPath $outPath2 > $out; echo dev > $dev";
}
