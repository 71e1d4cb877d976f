"""Streaming text: stop strings never leak, partial characters are held back."""
from runtime.text import Detokenizer, StopStrings, TextCodec


def test_stop_string_split_across_deltas_is_cut_and_never_sent():
    stops = StopStrings(["\nUser:"])
    sent = []
    for delta in ["Hello", " there", "\nUs", "er:", " more"]:
        out, hit = stops.feed(delta)
        sent.append(out)
        if hit:
            break
    assert "".join(sent) == "Hello there" and hit


def test_without_a_stop_everything_is_sent_by_the_end():
    stops = StopStrings(["###"])
    sent = [stops.feed(d)[0] for d in ["a#", "b#", "#c"]]
    sent.append(stops.feed("", final=True)[0])
    assert "".join(sent) == "a#b##c"


def test_detokenizer_rebuilds_multibyte_text(tiny_model):
    codec = TextCodec(tiny_model)
    text = "안녕하세요 서울, hello herd"
    ids = codec.encode(text)
    detok = Detokenizer(codec)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_end_of_sequence_is_never_text(tiny_model):
    codec = TextCodec(tiny_model)
    detok = Detokenizer(codec, skip=set(codec.eos_ids))
    assert detok.add(codec.eos_ids[0]) == ""
