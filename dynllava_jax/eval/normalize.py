"""The EvalAI / m4c answer normalisation and the VQA soft score over human references.

Behaves as ``EvalAIAnswerProcessor`` and ``TextVQAAccuracyEvaluator`` in LLaVA's
``llava/eval/m4c_evaluator.py`` (itself from mmf), quirks included, because published TextVQA /
VQAv2 figures were computed with it:

* punctuation next to a space (or anywhere, if the text has a digit,comma,digit run, which cannot
  happen since commas are dropped first) is deleted, otherwise replaced by a space;
* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` was meant as a look-behind but is a look-ahead for the
  text "<=digit", so it deletes every "." not followed by a digit, and since ``re.UNICODE`` is
  passed where ``sub`` takes its count, at most 32 of them;
* number words up to ten become digits, articles are dropped, and a fixed table restores
  apostrophes in contractions (its capitalised keys never match lowercased text, as there).
"""

from __future__ import annotations

import re

# "value<key1,key2": each key (a word after the steps above) becomes value.
_CONTRACTION_TABLE = """
ain't<aint aren't<arent can't<cant could've<couldve couldn't<couldnt
couldn't've<couldn'tve,couldnt've didn't<didnt doesn't<doesnt don't<dont hadn't<hadnt
hadn't've<hadnt've,hadn'tve hasn't<hasnt haven't<havent he'd<hed he'd've<hed've,he'dve
he's<hes how'd<howd how'll<howll how's<hows I'd've<Id've,I'dve I'm<Im I've<Ive isn't<isnt
it'd<itd it'd've<itd've,it'dve it'll<itll let's<let's ma'am<maam mightn't<mightnt
mightn't've<mightnt've,mightn'tve might've<mightve mustn't<mustnt must've<mustve
needn't<neednt not've<notve o'clock<oclock oughtn't<oughtnt 'ow's'at<ow's'at,'ows'at,'ow'sat
shan't<shant she'd've<shed've,she'dve she's<she's should've<shouldve shouldn't<shouldnt
shouldn't've<shouldnt've,shouldn'tve somebodyd<somebody'd
somebody'd've<somebodyd've,somebody'dve somebody'll<somebodyll somebody's<somebodys
someone'd<someoned someone'd've<someoned've,someone'dve someone'll<someonell
someone's<someones something'd<somethingd something'd've<somethingd've,something'dve
something'll<somethingll that's<thats there'd<thered there'd've<thered've,there'dve
there're<therere there's<theres they'd<theyd they'd've<theyd've,they'dve they'll<theyll
they're<theyre they've<theyve 'twas<twas wasn't<wasnt we'd've<wed've,we'dve we've<weve
weren't<werent what'll<whatll what're<whatre what's<whats what've<whatve when's<whens
where'd<whered where's<wheres where've<whereve who'd<whod who'd've<whod've,who'dve
who'll<wholl who's<whos who've<whove why'll<whyll why're<whyre why's<whys won't<wont
would've<wouldve wouldn't<wouldnt wouldn't've<wouldnt've,wouldn'tve y'all<yall
y'all'll<yall'll,y'allll y'all'd've<yall'd've,y'alld've,y'all'dve you'd<youd
you'd've<youd've,you'dve you'll<youll you're<youre you've<youve
"""
CONTRACTIONS = {key: value for item in _CONTRACTION_TABLE.split()
                for value, keys in [item.split("<")] for key in keys.split(",")}

NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBERS["none"] = "0"
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: see the module docstring
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PERIOD_MAX = int(re.UNICODE)  # the official call passes re.UNICODE (32) as sub's count


def _punctuation(text: str) -> str:
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        # The test looks at the input text, not at what earlier replacements left.
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX)


def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA / TextVQA evaluation compares it."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def soft_scores(references: list[str]) -> dict[str, float]:
    """VQA accuracy of each distinct normalised reference: the mean, over leaving out each of the
    n references in turn, of min(1, matches among the other n-1 / 3)."""
    refs = [normalize_answer(r) for r in references]
    n = len(refs)
    scores = {}
    for ans in set(refs):
        c = refs.count(ans)
        # The c references equal to ans see c-1 matches when left out; the other n-c see c.
        scores[ans] = (c * min(1.0, (c - 1) / 3) + (n - c) * min(1.0, c / 3)) / n
    return scores


def vqa_score(prediction: str, references: list[str]) -> float:
    """The VQA soft accuracy of one prediction (0 when it matches no reference)."""
    return soft_scores(references).get(normalize_answer(prediction), 0.0)
