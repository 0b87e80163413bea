# disallowedReferences: the output must not refer to the listed inputs (it does not).
let
  mk = import ./lib/mk.nix;
  used = mk {
    name = "disallowed-used";
    script = "echo used > $out";
  };
  forbidden = mk {
    name = "disallowed-forbidden";
    script = "echo forbidden > $out";
  };
in
mk {
  name = "disallowed-references";
  disallowedReferences = [ forbidden ];
  script = "echo ${used} > $out; read x < ${forbidden}";
}
