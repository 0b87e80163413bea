# __structuredAttrs: attributes go to the builder as JSON (.attrs.json / .attrs.sh)
# with their types kept: nested sets and lists, integers, floats, booleans, null.
derivation {
  name = "structured-attrs";
  __structuredAttrs = true;
  builder = "/bin/bash";
  args = [
    "-c"
    "source .attrs.sh; echo \"$name $count $enabled\" > \${outputs[out]}"
  ];
  system = builtins.currentSystem;
  count = 42;
  negative = -7;
  ratio = 0.25;
  big = 1.5e10;
  enabled = true;
  disabled = false;
  nothing = null;
  text = "line one\nline two\t\"quoted\" \\ $dollar";
  unicode = "Grüße, 世界 🦀";
  emptyString = "";
  emptyList = [ ];
  emptySet = { };
  list = [
    1
    "two"
    3.5
    true
    null
    [ "nested" [ ] ]
    { inner = "set"; }
  ];
  nested = {
    level1 = {
      level2 = {
        level3 = [
          1
          2
          3
        ];
        flag = false;
      };
    };
    "key with spaces" = "value";
    "ключ" = "значение";
  };
}
