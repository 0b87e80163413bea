# Non-ASCII text in every place a string may go: UTF-8 of one to four bytes,
# combining marks, right-to-left text, emoji sequences.
import ./lib/mk.nix {
  name = "unicode";
  latin = "Grüße, façade, naïve, Ørsted";
  greek = "λόγος";
  cyrillic = "Привет, мир";
  cjk = "日本語のテキスト、中文，한국어";
  rtl = "مرحبا بالعالم שלום";
  emoji = "🦀 🔥 👩‍👩‍👧 🏳️‍🌈";
  combining = builtins.fromJSON ''"e\u0301 a\u030a"'';
  noncharacters = builtins.fromJSON ''"\uFFFD \uFEFF \u200B"'';
  "ключ-с-юникодом" = "значение";
  script = "echo \"ünïcödé ✓ $greek $emoji\" > $out";
}
