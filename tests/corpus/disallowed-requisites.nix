# disallowedRequisites: a path that must not be anywhere in the output's closure.
let
  mk = import ./lib/mk.nix;
  tool = mk {
    name = "build-time-only-tool";
    script = "echo tool > $out";
  };
  runtime = mk {
    name = "runtime-dep";
    script = "echo runtime > $out";
  };
in
mk {
  name = "disallowed-requisites";
  disallowedRequisites = [ tool ];
  script = "read x < ${tool}; echo ${runtime} > $out";
}
