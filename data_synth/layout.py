"""The one text layout of synthesised records: MMEB's, which is what the model sees at evaluation.

A text is its instruction, then its content, joined by one space, then a newline, as in mmE5's released
data: `Represent the given image with the following question: What is in the image\n` for a query, the raw
label followed by a newline for a text target. Training on any other layout would teach the model strings
it never meets at evaluation, so every text synthesis writes (records and embedder inputs) goes through here.
"""


def mmeb_text(*parts):
    """`parts` (an instruction and/or a text), stripped, joined by one space, with the trailing newline."""
    return " ".join(part.strip() for part in parts if part is not None and part.strip()) + "\n"


IMAGE_TARGET_TEXT = mmeb_text("Represent the given image.")
