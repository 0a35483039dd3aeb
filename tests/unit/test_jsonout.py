"""`--json` output is stable: every field present, numbers as numbers, short enum names."""

from __future__ import annotations

import json

from sidecar.cli.support import dump, dump_line
from sidecar.jsonout import to_dict
from sidecar.v1 import inference_pb2 as pb


def test_zero_values_are_present_and_64_bit_integers_are_numbers() -> None:
    reply = pb.StatusReply(memory_available_bytes=2**40, counters={"Generate.OK": 0, "x": 3})
    model = reply.models.add()
    model.workers.add(rss_bytes=5 * 2**30)  # requests 0 and state "" still appear
    data = json.loads(dump(reply))
    assert data["memory_available_bytes"] == 2**40
    assert data["counters"] == {"Generate.OK": 0, "x": 3}
    worker = data["models"][0]["workers"][0]
    assert worker["rss_bytes"] == 5 * 2**30
    assert worker["requests"] == 0
    # Every field of the message is a key, whatever its value.
    assert set(worker) == {f.name for f in pb.WorkerStatus.DESCRIPTOR.fields}
    assert set(data) == {f.name for f in pb.StatusReply.DESCRIPTOR.fields}


def test_unset_submessages_and_optionals_are_null_and_enums_short() -> None:
    reply = pb.GenerateReply(text="hi", finish_reason=pb.FINISH_REASON_LENGTH)
    data = to_dict(reply)
    assert data["finish_reason"] == "length"
    assert data["route"] is None  # not set: null, not an object of defaults
    reply.route.served_by = "local"
    data = to_dict(reply)
    assert data["route"]["served_by"] == "local"
    assert data["route"]["local_confidence"] is None  # `optional`, unset
    reply.route.local_confidence = 0.0
    assert to_dict(reply)["route"]["local_confidence"] == 0.0
    assert to_dict(pb.GenerateReply())["finish_reason"] == "unspecified"


def test_non_finite_floats_are_null_so_the_output_is_strict_json() -> None:
    reply = pb.ClassifyReply(label="a")
    reply.scores.add(label="a", probability=1.0, logprob=0.0)
    reply.scores.add(label="b", probability=0.0, logprob=float("-inf"))
    text = dump(reply)
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
    assert [s["logprob"] for s in data["scores"]] == [0.0, None]
    assert all(isinstance(s["probability"], float) for s in data["scores"])


def test_token_bytes_are_lists_of_byte_values_and_progress_is_one_line_each() -> None:
    reply = pb.GenerateReply(text="é")
    reply.logprobs.add(token="é", bytes="é".encode(), logprob=-0.25)
    data = to_dict(reply)
    assert data["logprobs"][0]["bytes"] == [0xC3, 0xA9]
    assert data["logprobs"][0]["top_logprobs"] == []
    step = pb.UpdateProgress(stage="fetching", done_bytes=2**33, total_bytes=2**34)
    line = dump_line(step)
    assert "\n" not in line and json.loads(line)["done_bytes"] == 2**33
    assert json.loads(line)["outcome"] is None
