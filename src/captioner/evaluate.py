"""Caption metrics exactly as the COCO caption evaluation computes them (``pycocoevalcap``).

BLEU-1..4, METEOR (needs Java), ROUGE-L and CIDEr-D over PTB-tokenised references and hypotheses
(the Stanford PTB tokenizer also needs Java; without it captions are tokenised by
``captioner.data.tokenizer.normalize``, which mirrors it, and the report says so). NLTK's corpus
BLEU is reported beside, for comparison with papers that use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from captioner.data.tokenizer import normalize
from captioner.io_utils import filtered_stderr

log = logging.getLogger(__name__)
_PTB_STATUS = re.compile(r"PTBTokenizer tokenized \d+ tokens at [\d.]+ tokens per second\.\s*$")
METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str], use_ptb: bool):
    if use_ptb:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tokenizer = PTBTokenizer()
        # The Java tokenizer reports "PTBTokenizer tokenized N tokens at ..." on stderr every call.
        quiet = filtered_stderr(_PTB_STATUS) if not os.environ.get("CAPTIONER_VERBOSE") else contextlib.nullcontext()
        with quiet:
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
    """Stop the METEOR Java process now, so that ``Meteor.__del__`` finds nothing left to do.

    ``__del__`` (at garbage collection or interpreter exit) takes ``scorer.lock`` and then closes, kills
    and waits for ``scorer.meteor_p``: so the process object stays (all three are no-ops on a stopped
    process; None made it raise "'NoneType' object has no attribute 'stdin'"), and the lock is left
    free. ``compute_score`` keeps the lock when it raises (e.g. Java died): it is then held by this
    thread, which is done with the scorer, so it is replaced rather than waited for.
    """
    import contextlib
    import threading

    process = scorer.meteor_p
    if process is not None:
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if process.poll() is None:
            process.kill()
        process.wait()
    scorer.lock = threading.Lock()


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


def split_fingerprint(dataset, split: str = "test") -> dict[str, Any]:
    """What a test split is, for the gate and its cache: data set name, the split, its number of
    images and a digest over each image's name, bytes and reference captions (a changed photo or
    caption is a different split)."""
    import hashlib

    digest = hashlib.sha256()
    images = dataset.splits[split]
    for image in images:
        digest.update(image.encode() + b"\0")
        path = dataset.image_path(image)
        if path.is_file():
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        for caption in dataset.captions[image]:
            digest.update(b"\0" + caption.encode())
        digest.update(b"\n")
    return {"dataset": dataset.name, "split": split, "images": len(images), "fingerprint": digest.hexdigest()[:16]}


def score_saved_model(saved_model_dir, dataset, split: str = "test", *, beam_size: int, max_length: int,
                      meteor: str = "auto", batch_size: int = 32) -> dict[str, Any]:
    """COCO scores of an exported SavedModel on a split's images: its own preprocessing and input
    size, its own length penalty, the given beam size and maximum length (as a candidate decoded)."""
    from captioner.predictor import SavedModelCaptioner

    captioner = SavedModelCaptioner(saved_model_dir)
    images = dataset.splits[split]
    hypotheses: dict[str, str] = {}
    for offset in range(0, len(images), batch_size):
        batch = images[offset:offset + batch_size]
        results = captioner.caption_files([dataset.image_path(i) for i in batch], beam_size=beam_size,
                                          max_length=max_length)
        hypotheses.update((image, result.caption) for image, result in zip(batch, results, strict=True))
    scores = coco_scores(dataset.split_captions(split), hypotheses, meteor=meteor)
    scores.update({"beam_size": beam_size, "max_length": max_length,
                   "length_penalty": float(captioner.metadata["length_penalty"]),
                   "no_repeat_ngram_size": captioner.no_repeat_ngram_size})
    return scores
