"""The token layout's tables and the prompt header: what the grammar reads without the encoder."""

import pytest

from musicray.encoding import encode
from musicray.song import SongError
from musicray.streams import OPTIONAL_INPUTS, STREAM_FIELDS, STREAMS, TASK_INPUTS, TASK_TARGET, decode_header, \
    task_inputs
from musicray.tokens import TASKS, Vocabulary

VOCAB = Vocabulary()


def test_every_task_writes_a_stream_and_reads_streams_that_exist():
    assert set(TASK_TARGET) == set(TASK_INPUTS) == set(TASKS)
    assert set(TASK_TARGET.values()) <= set(STREAMS)
    for task in TASKS:
        assert set(task_inputs(task, OPTIONAL_INPUTS.get(task, ()))) <= set(STREAMS) & set(STREAM_FIELDS)


def test_the_header_reads_back_what_the_encoder_wrote(synthetic_songs):
    song = synthetic_songs[0]
    for task in TASKS:
        header = decode_header(encode(song, task, VOCAB).prompt, VOCAB)
        assert (header.task, header.key, header.metre, header.sections) == (task, song.key, song.metre, song.sections)
        assert list(header.inputs) == list(TASK_INPUTS[task])


@pytest.mark.parametrize("tokens, message", [
    ("<Key_C:maj><Task_melody>", r"expected <Task_\.\.><Key_\.\.><Metre_\.\.><Tempo_\.\.> first"),
    ("<Task_melody><Key_C:maj><Metre_4/4><Tempo_120>", "the header names no section"),
    ("<Task_melody><Key_C:maj><Metre_4/4><Tempo_120><Sec_A1><Bar>", "unexpected <Bar> after the header"),
])
def test_a_bad_header_is_a_prompt_error(tokens, message):
    with pytest.raises(SongError, match="prompt: " + message):
        decode_header(VOCAB.parse(tokens), VOCAB)
