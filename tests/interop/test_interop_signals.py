"""The interop harness's signal helpers, so a wrong helper cannot pass a broken relay.

G.711 mu-law is checked against the standard's fixed points and its quantisation bound;
correlation and first_difference against cases whose answer is known.
"""

from __future__ import annotations

from interop_support import correlation, first_difference, tone, ulaw_decode, ulaw_encode


def test_ulaw_matches_g711_fixed_points() -> None:
    assert ulaw_decode(bytes([0x00, 0x80, 0x7F, 0xFF])) == [-32_124, 32_124, 0, 0]
    assert ulaw_encode([0, 32_767, -32_768]) == bytes([0xFF, 0x80, 0x00])


def test_ulaw_round_trip_stays_within_its_quantisation_step() -> None:
    samples = list(range(-32_768, 32_768, 97))
    for sample, back in zip(samples, ulaw_decode(ulaw_encode(samples)), strict=True):
        # a segment's step is 1/16 of its span: the error is at most half a step there
        assert abs(back - sample) <= max(8, abs(sample) // 16 + 8)
    # every code is a fixed point of decode-then-encode, up to the two zeros (0x7F, 0xFF)
    codes = bytes(range(256))
    again = ulaw_encode(ulaw_decode(codes))
    assert [c for c, a in zip(codes, again, strict=True) if c != a] == [0x7F]


def test_correlation_of_known_signals() -> None:
    signal = tone(440.0, 0.1, 8_000)
    assert abs(correlation(signal, signal) - 1.0) < 1e-9
    assert abs(correlation(signal, [-x for x in signal]) + 1.0) < 1e-9
    assert correlation(signal, [0] * len(signal)) == 0.0
    assert abs(correlation(signal, tone(1_000.0, 0.1, 8_000))) < 0.1


def test_first_difference_names_the_first_chunk_that_differs() -> None:
    assert first_difference(b"abcd", b"abcd", 2) is None
    assert first_difference(b"abcd", b"abdc", 2) == (
        "chunk 1 (bytes 2..4) differs; sent 4 bytes, received 4")
    assert first_difference(b"abcd", b"abcdef", 2) == (
        "chunk 2 (bytes 4..6) differs; sent 4 bytes, received 6")
    assert first_difference(b"abcd", b"ab", 2) == (
        "chunk 1 (bytes 2..4) differs; sent 4 bytes, received 2")
