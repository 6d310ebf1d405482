"""Deterministic synthetic text for training the tokenizers of random-weight checkpoints.

The mix (English-like prose, numbers, code, a little emoji and CJK) gives a byte-level BPE
realistic merges, while rare emoji and CJK stay split across several byte tokens, which is
exactly what incremental detokenization has to cope with.
"""

import random
from collections.abc import Iterator

WORDS = (
    "the of and to in is was for on that with as by at from it this be are or an have not "
    "which one you all were her she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time "
    "these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three model "
    "token cache block request server worker router prefix batch memory latency stream queue "
    "river mountain window garden kitchen market letter music paper story water village "
    "bright quiet rapid gentle simple careful happy early late small large green blue red "
    "run walk read write open close build serve measure compute carry hold share find keep"
).split()

NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Oscar Peggy Trent".split()
SYLLABLES = "ka ri to ne sa mo lu pe vi da zo fi ga be ho ru ti ma no se".split()
EMOJI = "😀 😂 🥲 😍 🤖 🚀 🔥 ✨ 🎉 👍 🙏 🌍 🍕 ☕ 🐍 🦀 ❤️ 👩‍💻 🇫🇷 🧪".split()
CJK = "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自可"
KANA = (
    "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"
)
PUNCT = (".", ".", ".", "!", "?", ";", ":")
IDENTS = "x y n i count total items result value index buffer config request tokens".split()
OPS = ("+", "-", "*", "//", "%", "==", "!=", "<=", ">=", "and", "or")


def _word(rng: random.Random) -> str:
    """A common English word most of the time, otherwise a pseudo-word built from syllables."""
    if rng.random() < 0.8:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _sentence(rng: random.Random) -> str:
    words = [_word(rng) for _ in range(rng.randint(4, 16))]
    if rng.random() < 0.3:
        words[rng.randrange(len(words))] = rng.choice(NAMES)
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), f"{rng.randint(0, 9999)}")
    text = " ".join(words)
    text = text[0].upper() + text[1:] + rng.choice(PUNCT)
    if rng.random() < 0.1:
        text += " " + rng.choice(EMOJI)
    return text


def _number_line(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return f"{rng.randint(1, 28):02d}/{rng.randint(1, 12):02d}/{rng.randint(1950, 2030)}"
    if kind == 1:
        return f"{rng.uniform(-1000, 1000):.{rng.randint(1, 4)}f}"
    if kind == 2:
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} took {rng.randint(1, 999)} ms"
    return ", ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(2, 6)))


def _code_line(rng: random.Random) -> str:
    a, b = rng.choice(IDENTS), rng.choice(IDENTS)
    kind = rng.randrange(6)
    if kind == 0:
        return f"def {a}_{b}({a}, {b}={rng.randint(0, 9)}):"
    if kind == 1:
        return f"    return {a} {rng.choice(OPS)} {b}"
    if kind == 2:
        return f"for (int i = 0; i < {a}.size(); i++) {{ {b} += i; }}"
    if kind == 3:
        return f'{{"{a}": {rng.randint(0, 100)}, "{b}": [{rng.random():.3f}, null, true]}}'
    if kind == 4:
        body = f"{a} = [{b} for {b} in range({rng.randint(1, 64)})]"
        return f"        if {a} is None:\n            {body}"
    return f"let {a}: Vec<u32> = {b}.iter().map(|v| v * {rng.randint(2, 9)}).collect();"


def _asian_line(rng: random.Random) -> str:
    alphabet = CJK if rng.random() < 0.6 else KANA
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 24)))
    return text + rng.choice(("。", "！", "？", "、", " " + rng.choice(EMOJI)))


def iter_corpus(num_lines: int = 20000, seed: int = 0) -> Iterator[str]:
    """Yields `num_lines` lines of mixed text; the same arguments always give the same lines."""
    rng = random.Random(seed)
    makers = (_sentence, _number_line, _code_line, _asian_line)
    weights = (0.62, 0.12, 0.18, 0.08)
    for _ in range(num_lines):
        (maker,) = rng.choices(makers, weights)
        line = maker(rng)
        if maker is _sentence and rng.random() < 0.5:
            line += " " + _sentence(rng)
        yield line
