# A chain three dependencies deep: each level reads the one below it at build time.
let
  mk = import ./lib/mk.nix;
  level0 = mk {
    name = "level0";
    script = "echo level0 > $out";
  };
  level1 = mk {
    name = "level1";
    script = "read below < ${level0}; echo \"level1 <- $below\" > $out";
  };
  level2 = mk {
    name = "level2";
    script = "read below < ${level1}; echo \"level2 <- $below\" > $out";
  };
in
mk {
  name = "level3";
  script = "read below < ${level2}; echo \"level3 <- $below ${level0}\" > $out";
}
