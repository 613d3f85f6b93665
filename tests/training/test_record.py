"""The typed run record (loralab.training.record): the layout of record.json, its one writer and
the reader, on the record of a real tiny run."""

from __future__ import annotations

import json

import pytest

from loralab.training.record import ExtraResults, Record, RecordWriter, read_record
from test_train import lm_data, run

LAYOUT = ["run_id", "status", "config", "metrics", "costs", "curves", "artifacts", "env", "notes",
          "tracking", "estimates"]


def test_a_real_record_round_trips_and_keeps_the_json_layout(tmp_path):
    rec = run(tmp_path, data=lm_data(n=16), max_steps=2)
    path = tmp_path / "run" / "record.json"
    text = path.read_text()
    written = json.loads(text)
    assert list(written) == LAYOUT
    assert written == json.loads(json.dumps(rec, default=str))
    record = read_record(path)
    assert record is not None and record.status == "finished"
    assert read_record(tmp_path / "run") == record  # the run directory works as well
    assert list(record.to_dict()) == LAYOUT
    assert record.to_dict() == written
    again = tmp_path / "again.json"
    RecordWriter(again).write(record)
    assert again.read_text() == text  # byte for byte


def test_unknown_keys_survive_and_optional_ones_appear_once_known(tmp_path):
    data = {"run_id": "r-1", "status": "running", "config": {"method": "lora"},
            "metrics": {}, "costs": {}, "curves": {}, "artifacts": {}, "env": {},
            "notes": [], "study_config": {"x": 1}}
    record = Record.from_dict(data)
    assert record.extra == {"study_config": {"x": 1}}
    assert record.to_dict() == data and list(record.to_dict()) == list(data)
    record.quant = {"scheme": "int8"}
    assert list(record.to_dict())[-2:] == ["quant", "study_config"]


def test_add_merges_extra_results():
    record = Record("r", "finished", {}, metrics={"test": {"loss": 1.0}}, costs={"a": 1},
                    notes=["n"])
    record.add(ExtraResults(metrics={"test": {"bleu": 2.0}, "gen": {"rouge": 3.0}},
                            costs={"generation_seconds": 4.0}, notes=["m"]))
    assert record.metrics == {"test": {"loss": 1.0, "bleu": 2.0}, "gen": {"rouge": 3.0}}
    assert record.costs == {"a": 1, "generation_seconds": 4.0} and record.notes == ["n", "m"]


def test_reader_and_writer_edges(tmp_path):
    assert read_record(tmp_path) is None  # no record.json
    (tmp_path / "record.json").write_text('{"run_id": "x"')  # torn
    assert read_record(tmp_path) is None
    with pytest.raises(KeyError, match="status"):
        Record.from_dict({"run_id": "x", "config": {}})
    with pytest.raises(ValueError, match="status"):
        Record("x", "paused", {})
    off = tmp_path / "off.json"
    RecordWriter(off, enabled=False).write(Record("x", "running", {}))
    assert not off.exists()
