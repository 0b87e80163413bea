# Empty strings as environment values and arguments; an empty list and false both
# become empty strings too.
derivation {
  name = "empty-strings";
  builder = "/bin/sh";
  args = [
    "-c"
    "echo \"[$empty][$1]\" > $out"
    ""
    ""
  ];
  system = builtins.currentSystem;
  empty = "";
  emptyList = [ ];
  falseValue = false;
  alsoEmpty = "";
}
