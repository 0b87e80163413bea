# __ignoreNulls: attributes whose value is null are left out of the environment
# (without it they become empty strings).
let
  mk = import ./lib/mk.nix;
in
{
  ignored = mk {
    name = "ignore-nulls";
    __ignoreNulls = true;
    dropped = null;
    kept = "kept";
    script = "echo \"[$dropped] [$kept]\" > $out";
  };
  kept = mk {
    name = "keep-nulls";
    empty = null;
    script = "echo \"[$empty]\" > $out";
  };
}
