#!/usr/bin/env python3
"""Independently decode a semseg (or SageMaker built-in) recordio-protobuf inference response and check it.

Usage: decode_recordio_protobuf.py RESPONSE_FILE [--classes C] [--height H] [--width W] [--decoder auto|protobuf|pure]

Reads the RecordIO framing (dmlc-core: u32 magic 0xced7230a, u32 lrec = cflag << 29 | length, data, zero padding to 4
bytes; split records with cflag 1/2/3 are joined with the magic between parts), parses the one aialgs.data.Record with
either the `protobuf` package (message definitions built here from the schema, no protoc) or a minimal pure-Python
wire-format decoder, and checks what the SageMaker example notebook relies on: feature "shape" (int32_tensor) is
[1, C, H, W], feature "target" (float32_tensor) holds C*H*W probabilities, each in [0, 1], summing to 1 per pixel.
Prints a JSON summary; exits 1 on any failed check.
"""

import argparse
import json
import struct
import sys

MAGIC = 0xCED7230A


def read_recordio(data):
    """All records of a RecordIO byte string."""
    records, pos, current = [], 0, None
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated header at byte %d" % pos)
        magic, lrec = struct.unpack_from("<II", data, pos)
        if magic != MAGIC:
            raise ValueError("bad magic %#x at byte %d" % (magic, pos))
        cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
        pos += 8
        if pos + length > len(data):
            raise ValueError("truncated record at byte %d" % pos)
        part = data[pos:pos + length]
        pos += length + (4 - length % 4) % 4
        if cflag == 0:
            if current is not None:
                raise ValueError("whole record inside a split record")
            records.append(part)
        elif cflag == 1:
            current = bytearray(part)
        elif cflag in (2, 3):
            if current is None:
                raise ValueError("continuation without a start")
            current += struct.pack("<I", MAGIC) + part
            if cflag == 3:
                records.append(bytes(current))
                current = None
    if current is not None:
        raise ValueError("unfinished split record")
    return records


def protobuf_record_class():
    """aialgs.data.Record built from a hand-written FileDescriptorProto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="semseg_aialgs_record.proto", package="aialgs.data", syntax="proto2")

    def add_field(msg, name, number, ftype, label=F.LABEL_OPTIONAL, type_name=None, packed=False, oneof=None):
        f = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            f.type_name = type_name
        if packed:
            f.options.packed = True
        if oneof is not None:
            f.oneof_index = oneof
        return f

    for name, vtype in (("Float32Tensor", F.TYPE_FLOAT), ("Float64Tensor", F.TYPE_DOUBLE), ("Int32Tensor", F.TYPE_INT32)):
        m = fdp.message_type.add(name=name)
        add_field(m, "values", 1, vtype, F.LABEL_REPEATED, packed=True)
        add_field(m, "keys", 2, F.TYPE_UINT64, F.LABEL_REPEATED, packed=True)
        add_field(m, "shape", 3, F.TYPE_UINT64, F.LABEL_REPEATED, packed=True)
    m = fdp.message_type.add(name="Bytes")
    add_field(m, "value", 1, F.TYPE_BYTES, F.LABEL_REPEATED)
    add_field(m, "content_type", 2, F.TYPE_STRING)
    m = fdp.message_type.add(name="Value")
    m.oneof_decl.add(name="value")
    for name, number, tname in (("float32_tensor", 2, "Float32Tensor"), ("float64_tensor", 3, "Float64Tensor"),
                                ("int32_tensor", 7, "Int32Tensor"), ("bytes", 9, "Bytes")):
        add_field(m, name, number, F.TYPE_MESSAGE, type_name=".aialgs.data." + tname, oneof=0)
    m = fdp.message_type.add(name="Record")
    for name, number in (("features", 1), ("label", 2)):
        entry = m.nested_type.add(name=name.capitalize() + "Entry")
        entry.options.map_entry = True
        add_field(entry, "key", 1, F.TYPE_STRING)
        add_field(entry, "value", 2, F.TYPE_MESSAGE, type_name=".aialgs.data.Value")
        add_field(m, name, number, F.TYPE_MESSAGE, F.LABEL_REPEATED,
                  type_name=".aialgs.data.Record." + entry.name)
    for name, number in (("uid", 3), ("metadata", 4), ("configuration", 5)):
        add_field(m, name, number, F.TYPE_STRING)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    descriptor = pool.FindMessageTypeByName("aialgs.data.Record")
    if hasattr(message_factory, "GetMessageClass"):
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(pool).GetPrototype(descriptor)


def decode_with_protobuf(record):
    cls = protobuf_record_class()
    rec = cls()
    rec.ParseFromString(record)
    shape = list(rec.features["shape"].int32_tensor.values)
    values = list(rec.features["target"].float32_tensor.values)
    tensor_shape = list(rec.features["target"].float32_tensor.shape)
    return shape, values, tensor_shape


def _varint(buf, pos):
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """(field number, wire type, value) of a protobuf message; value is bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError("unsupported wire type %d" % wire)
        yield number, wire, value


def _packed_varints(buf):
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def decode_pure(record):
    features = {}
    for number, wire, value in _fields(record):
        if number == 1 and wire == 2:  # map entry: key = 1, value = 2
            key, val = None, b""
            for n, _, v in _fields(value):
                if n == 1:
                    key = bytes(v).decode()
                elif n == 2:
                    val = v
            features[key] = val
    shape, values, tensor_shape = [], [], []
    for number, wire, value in _fields(features["shape"]):
        if number == 7:  # int32_tensor
            for n, w, v in _fields(value):
                if n == 1:
                    ints = _packed_varints(v) if w == 2 else [v]
                    shape += [i - (1 << 64) if i >= 1 << 63 else i for i in ints]
    for number, wire, value in _fields(features["target"]):
        if number == 2:  # float32_tensor
            for n, w, v in _fields(value):
                if n == 1:
                    values += list(struct.unpack("<%df" % (len(v) // 4), v))
                elif n == 3:
                    tensor_shape += _packed_varints(v) if w == 2 else [v]
    return shape, values, tensor_shape


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("response")
    parser.add_argument("--classes", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--decoder", choices=("auto", "protobuf", "pure"), default="auto")
    args = parser.parse_args()

    with open(args.response, "rb") as f:
        data = f.read()
    records = read_recordio(data)
    problems = []
    if len(records) != 1:
        problems.append("expected 1 record, found %d" % len(records))
    decoder = args.decoder
    if decoder == "auto":
        try:
            import google.protobuf  # noqa: F401
            decoder = "protobuf"
        except ImportError:
            decoder = "pure"
    shape, values, tensor_shape = (decode_with_protobuf if decoder == "protobuf" else decode_pure)(records[0])

    if len(shape) != 4 or shape[0] != 1:
        problems.append("feature shape is %r, expected [1, C, H, W]" % (shape,))
    expected = [1, args.classes, args.height, args.width]
    for i, (got, want) in enumerate(zip(shape, expected)):
        if want is not None and got != want:
            problems.append("shape[%d] is %d, expected %d" % (i, got, want))
    if tensor_shape and tensor_shape != shape:
        problems.append("target's tensor shape %r differs from feature shape %r" % (tensor_shape, shape))
    count = 1
    for d in shape:
        count *= d
    if len(values) != count:
        problems.append("target holds %d values, shape %r needs %d" % (len(values), shape, count))
    worst = 0.0
    if not problems:
        _, c, h, w = shape
        plane = h * w
        if any(not (0.0 <= v <= 1.0) for v in values):
            problems.append("a probability lies outside [0, 1]")
        for i in range(plane):
            total = sum(values[k * plane + i] for k in range(c))
            worst = max(worst, abs(total - 1.0))
        if worst > 1e-4:
            problems.append("probabilities do not sum to 1 per pixel (worst error %g)" % worst)
    print(json.dumps({"decoder": decoder, "shape": shape, "values": len(values), "max_sum_error": worst,
                      "ok": not problems, "problems": problems}))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
