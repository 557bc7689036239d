import json

import pytest

from captioner.constants import END_ID, START_ID, UNK_ID
from captioner.data.tokenizer import Tokenizer, normalize
from captioner.errors import DataError
from captioner.evaluate import java_available

from ..conftest import FLICKR8K

pytestmark = pytest.mark.unit


def test_normalize_matches_the_evaluation_tokenisation():
    assert normalize("A dog's ball .") == ["a", "dog", "'s", "ball"]
    assert normalize("Two kids don't play, in the T-shirt!") == ["two", "kids", "do", "n't", "play", "in", "the",
                                                                 "t-shirt"]


def test_fit_counts_and_limits():
    tok = Tokenizer.fit(["a dog runs", "a dog sits", "a cat"], min_count=2, max_size=10)
    assert tok.tokens[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert tok.tokens[4:] == ["a", "dog"]  # by count, then alphabetically; 'runs', 'sits', 'cat' are rare
    assert Tokenizer.fit(["a b c d e f"], min_count=1, max_size=6).vocab_size == 6


def test_round_trip_and_out_of_vocabulary():
    tok = Tokenizer.fit(["a dog runs on the grass", "a dog"], min_count=1)
    ids = tok.encode("A dog runs on the grass .")
    assert ids[0] == START_ID and ids[-1] == END_ID
    assert tok.decode(ids) == "a dog runs on the grass"
    oov = tok.encode("a zebra runs")
    assert oov[2] == UNK_ID and tok.decode(oov) == "a <unk> runs"
    assert len(tok.encode("a dog runs on the grass", max_length=5)) == 5


def test_saved_as_json_and_loaded(tmp_path):
    tok = Tokenizer.fit(["a dog runs", "a cat sits"], min_count=1)
    path = tok.save(tmp_path)
    assert json.loads(path.read_text())["tokens"] == tok.tokens
    assert (tmp_path / "vocab.txt").read_text().splitlines() == tok.tokens
    assert Tokenizer.load(tmp_path).tokens == tok.tokens
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(DataError, match=r"vocab.json:1: invalid JSON"):
        Tokenizer.load(tmp_path)


def test_in_graph_lookup_equals_python_decode(tmp_path):
    import tensorflow as tf

    from captioner.data.tokenizer import id_to_token_table, ids_to_text

    tok = Tokenizer.fit(["a dog runs on the grass"], min_count=1)
    tok.save(tmp_path)
    table = id_to_token_table(tmp_path / "vocab.txt")
    rows = [tok.encode("a dog runs")[1:] + [0, 0], tok.encode("the grass")[1:] + [5, 6, 7]]
    texts = ids_to_text(tf.constant(rows), table).numpy().astype(str).tolist()
    assert texts == [tok.decode(r) for r in rows] == ["a dog runs", "the grass"]


@pytest.mark.skipif(not java_available(), reason="the PTB tokenizer of the COCO evaluation needs Java")
@pytest.mark.skipif(not (FLICKR8K / "captions.tsv").is_file(), reason="real Flickr8k captions absent (../shared)")
def test_agrees_with_the_ptb_tokenizer_on_real_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    lines = (FLICKR8K / "captions.tsv").read_text().splitlines()[::20]
    captions = {str(i): [{"caption": line.split("\t")[1]}] for i, line in enumerate(lines)}
    ptb = PTBTokenizer().tokenize(captions)
    same = sum(ptb[k][0].split() == normalize(v[0]["caption"]) for k, v in captions.items())
    assert same / len(captions) >= 0.995, f"{same}/{len(captions)} agree"
