# preferLocalBuild: build here rather than on a remote builder.
import ./lib/mk.nix {
  name = "prefer-local-build";
  preferLocalBuild = true;
  script = "echo local > $out";
}
