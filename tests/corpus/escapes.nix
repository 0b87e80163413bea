# Every escape the .drv format has (\" \\ \n \r \t), in the environment, the
# arguments and the builder's script, next to `$` and `${` that must stay literal.
import ./lib/mk.nix {
  name = "escapes";
  quote = "a \"quoted\" word";
  backslash = "back\\slash and \\\\ two, \\n not a newline";
  newline = "line one\nline two\n";
  carriageReturn = "windows\r\nline\r";
  tab = "col1\tcol2\t";
  dollar = "$HOME \${notInterpolated} $$ ''";
  mixed = "\"\\\n\r\t\"";
  indented = ''
    an indented string with ''${literal} and '''quotes'''
      and "double quotes" and \backslashes\
  '';
  script = "printf '%s|%s|%s\\n' \"$quote\" \"$backslash\" \"$tab\" > $out";
}
