"""Caption metrics exactly as the COCO caption evaluation computes them (``pycocoevalcap``).

BLEU-1..4, METEOR (needs Java), ROUGE-L and CIDEr-D over PTB-tokenised references and hypotheses
(the Stanford PTB tokenizer also needs Java; without it captions are tokenised by
``captioner.data.tokenizer.normalize``, which mirrors it, and the report says so). NLTK's corpus
BLEU is reported beside, for comparison with papers that use it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence

from captioner.data.tokenizer import normalize

log = logging.getLogger(__name__)
METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str], use_ptb: bool):
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        refs = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
        hyps = tokenizer.tokenize({k: [{"caption": hypotheses[k]}] for k in references})
        return refs, hyps
    refs = {k: [" ".join(normalize(c)) for c in v] for k, v in references.items()}
    hyps = {k: [" ".join(normalize(hypotheses[k]))] for k in references}
    return refs, hyps


def coco_scores(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
                meteor: str = "auto") -> dict[str, float | str | None]:
    """Score ``hypotheses[image]`` against all ``references[image]``; keys as in ``METRIC_KEYS``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    missing = [k for k in references if k not in hypotheses]
    if missing:
        raise ValueError(f"{len(missing)} image(s) have no hypothesis, e.g. {missing[:3]}")
    java = java_available()
    refs, hyps = _tokenize(references, hypotheses, use_ptb=java)
    # An empty hypothesis breaks the scorers' length bookkeeping; score it as the empty word.
    hyps = {k: [h[0] if h[0].strip() else "<empty>"] for k, h in hyps.items()}
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    out: dict[str, float | str | None] = {f"bleu{i + 1}": float(b) for i, b in enumerate(bleu)}
    out["rouge_l"] = float(Rouge().compute_score(refs, hyps)[0])
    out["cider"] = float(Cider().compute_score(refs, hyps)[0])
    out["meteor"] = None
    if meteor == "on" and not java:
        raise RuntimeError("eval.meteor=on needs Java (METEOR 1.5 is a Java program); install a JRE")
    if meteor != "off" and java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(refs, hyps)[0])
        finally:
            _close_meteor(scorer)
    out["tokenizer"] = "ptb" if java else "captioner.normalize"
    out["nltk_bleu4"] = nltk_corpus_bleu(references, hypotheses)
    return out


def _close_meteor(scorer) -> None:
    with scorer.lock:
        if scorer.meteor_p:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
            scorer.meteor_p = None


def nltk_corpus_bleu(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> float:
    import warnings

    from nltk.translate.bleu_score import corpus_bleu

    keys = list(references)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "0 counts of n-gram overlaps" on tiny data
        return float(corpus_bleu([[normalize(r) for r in references[k]] for k in keys],
                                 [normalize(hypotheses[k]) for k in keys]))


def quick_bleu4(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str]) -> float:
    """COCO BLEU-4 on ``normalize``-tokenised text, pure Python: for per-epoch model selection."""
    from pycocoevalcap.bleu.bleu import Bleu

    refs, hyps = _tokenize(references, hypotheses, use_ptb=False)
    hyps = {k: [h[0] if h[0].strip() else "<empty>"] for k, h in hyps.items()}
    return float(Bleu(4).compute_score(refs, hyps, verbose=0)[0][3])
