"""Hypothesis strategies shared by the tests of the song's encodings (test_encoding, test_quantize, test_windows)."""

from hypothesis import strategies as st

from musicray.harmony import CANONICAL_BASS_DEGREES, CHORD_QUALITIES, PITCH_CLASS_NAMES, chord_label
from musicray.song import METRES, SECTION_LABELS, TRACKS, Chord, Note, Section, Song, Tempo


@st.composite
def songs(draw):
    metre = METRES[draw(st.sampled_from(sorted(METRES)))]
    sections = draw(st.lists(st.builds(Section, st.sampled_from(SECTION_LABELS), st.integers(1, 4)),
                             min_size=1, max_size=3))
    n_bars = sum(s.bars for s in sections)
    time = st.tuples(st.integers(0, n_bars - 1), st.integers(0, metre.positions_per_bar - 1))
    label = st.one_of(st.just("N"), st.builds(
        lambda root, quality, bass: chord_label(root, quality, bass),
        st.integers(0, 11), st.sampled_from(list(CHORD_QUALITIES)), st.sampled_from(("",) + CANONICAL_BASS_DEGREES)))
    chords = draw(st.lists(st.builds(lambda t, lab: Chord(t[0], t[1], lab), time, label), max_size=8))
    note = st.builds(lambda t, p, d, v: Note(t[0], t[1], p, d, v), time, st.integers(0, 127), st.integers(1, 100),
                     st.integers(1, 127))
    tracks = {name: draw(st.lists(note, max_size=12)) for name in TRACKS}
    tempos = draw(st.lists(st.builds(lambda t, bpm: Tempo(t[0], t[1], bpm), time, st.floats(20, 300)), max_size=6))
    key = f"{draw(st.sampled_from(PITCH_CLASS_NAMES))}:{draw(st.sampled_from(['maj', 'min']))}"
    return Song("hyp", key, metre.name, sections, chords, tracks, tempos)
