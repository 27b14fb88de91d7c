"""The one protobuf message shape record shards use: a tf.Example holding a single bytes feature.

TFDS reads every ArrayRecord entry as a serialized tf.Example. Encoding that one shape by hand keeps TensorFlow,
TFDS and generated protobuf classes out of the core install; the decoder skips fields it does not need.
"""


def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number, payload):
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_bytes_feature(name, value):
    """A serialized tf.Example whose only feature `name` is a bytes list holding `value`."""
    # Example.features -> Features.feature (map entry: key, value) -> Feature.bytes_list -> BytesList.value
    return _field(1, _field(1, _field(1, name.encode()) + _field(2, _field(1, _field(1, value)))))


def _read_varint(data, pos):
    value = shift = 0
    while shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _fields(data):
    """The length-delimited fields of one protobuf message, as (number, value); other wire types are skipped."""
    pos, fields = 0, []
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        wire = key & 7
        if wire == 0:
            pos = _read_varint(data, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _read_varint(data, pos)
            fields.append((key >> 3, data[pos:pos + size]))
            pos += size
        else:
            raise ValueError(f"wire type {wire} has no place in a tf.Example")
        if pos > len(data):
            raise ValueError("message is truncated")
    return fields


def read_bytes_feature(data, name):
    """The one value of bytes feature `name` in a serialized tf.Example (the last, if the map repeats it)."""
    found = None
    for features in (value for number, value in _fields(data) if number == 1):  # Example.features
        for entry in (value for number, value in _fields(features) if number == 1):  # Features.feature
            entry = dict(_fields(entry))  # a map entry: key (1) -> Feature (2)
            if entry.get(1) != name.encode():
                continue
            bytes_lists = [value for number, value in _fields(entry.get(2, b"")) if number == 1]
            values = [value for lst in bytes_lists for number, value in _fields(lst) if number == 1]
            if len(values) != 1:
                raise ValueError(f"feature {name!r} holds {len(values)} bytes values, expected 1")
            found = values[0]
    if found is None:
        raise ValueError(f"no bytes feature {name!r}")
    return bytes(found)
