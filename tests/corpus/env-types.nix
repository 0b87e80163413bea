# Values that are not strings turn into environment strings: integers, booleans
# (true is "1", false is ""), null (""), lists (space-separated), paths (copied to
# the store), floats, and derivations (their output path).
let
  mk = import ./lib/mk.nix;
  dep = mk {
    name = "env-types-dep";
    script = "echo dep > $out";
  };
in
mk {
  name = "env-types";
  integer = 12345;
  negative = -1;
  float = 2.5;
  yes = true;
  no = false;
  nothing = null;
  list = [
    "a"
    1
    true
    false
    null
    dep
    [ "nested" ]
  ];
  path = ./src/hello.txt;
  derivationValue = dep;
  script = "echo \"$integer $yes $list\" > $out";
}
