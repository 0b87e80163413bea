# A store path mentioned with its string context discarded: it appears in the
# environment but is no input of the derivation.
let
  mk = import ./lib/mk.nix;
  dep = mk {
    name = "discarded-dep";
    script = "echo dep > $out";
  };
in
mk {
  name = "context-discarded";
  mention = builtins.unsafeDiscardStringContext "${dep}";
  script = "echo \"$mention\" > $out";
}
