"""Large and hostile data files: read as a stream (memory bounded by a record or a batch, not the file), an
over-long record set aside with its start, and a file name never taken for a pattern."""

from __future__ import annotations

import csv
import io
import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from freeal_stream.config import DataConfig
from freeal_stream.readers import MAX_RECORD_BYTES, RAW_KEPT, read_csv, read_jsonl
from freeal_stream.sources import DataError, read_batches, read_items


def peak_traced(fn) -> int:
    """Peak bytes Python allocated while `fn` ran."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "suffix, head, line",
    [
        (".csv", "text\n", "a" * (24 << 20)),
        (".jsonl", "", json.dumps({"text": "a" * (24 << 20)})),
    ],
)
def test_a_huge_one_line_file_is_read_in_bounded_memory(tmp_path, suffix, head, line):
    data = tmp_path / f"big{suffix}"
    data.write_text(head + line + "\n" + (json.dumps({"text": "after"}) if suffix == ".jsonl" else "after") + "\n")
    batches = []
    peak = peak_traced(lambda: batches.extend(read_batches(DataConfig(path=str(data)))))
    assert peak < 4 * MAX_RECORD_BYTES, f"peak {peak / 1e6:.1f} MB for a {data.stat().st_size / 1e6:.0f} MB file"
    assert [t for b in batches for t in b.texts] == ["after"]
    [p] = [p for b in batches for p in b.problems]
    assert p.reason == "record too long" and p.action == "quarantined"
    assert len(p.raw) <= RAW_KEPT + 10 and str(len(line) + 1) in p.detail


def test_a_json_array_with_an_over_long_element_is_refused_in_bounded_memory(tmp_path):
    data = tmp_path / "big.json"
    data.write_text("[" + json.dumps({"text": "a"}) + "," + json.dumps({"text": "b" * (24 << 20)}) + "]")
    caught = []

    def read():
        with pytest.raises(DataError, match=r"not one valid JSON array \(element 2 is over 1048576 bytes\)"):
            list(read_batches(DataConfig(path=str(data))))
        caught.append(True)

    assert peak_traced(read) < 4 * MAX_RECORD_BYTES and caught


def test_batches_are_bounded_by_rows_and_bytes_and_number_rows_across_the_file(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text\n" + "".join(f"row number {n}\n" for n in range(25)))
    batches = list(read_batches(DataConfig(path=str(data)), rows=10))
    assert [len(b.ids) for b in batches] == [10, 10, 5]
    assert [i for b in batches for i in b.ids] == [f"row-{n}" for n in range(25)]
    assert [len(b.ids) for b in read_batches(DataConfig(path=str(data)), max_bytes=100)] == [8, 8, 8, 1]


def _reference_csv(text: str) -> list[list[str]]:
    return [row for row in csv.reader(io.StringIO(text, newline=""), strict=True) if row]


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_the_streamed_csv_reader_parses_as_the_csv_module_does_across_read_boundaries(tmp_path, ending):
    rng = random.Random(3)
    words = ["plain", "with, comma", 'a "quote"', f"two{ending}lines", "caf\u00e9", "x" * 3000, "", "  spaced  "]
    rows = [["id", "text"]] + [
        [str(n), " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))] for n in range(400)
    ]
    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=ending).writerows(rows)
    data = tmp_path / "d.csv"
    data.write_bytes(out.getvalue().encode("utf-8"))
    assert data.stat().st_size > 4 * 65536  # records straddle the reader's 64 KiB reads
    records = read_csv(data)
    got = [[r.values["id"], r.values["text"]] for r in records.rows]
    assert records.columns == ["id", "text"] and got == _reference_csv(out.getvalue())[1:]


def test_a_streamed_json_array_gives_every_element_with_its_row(tmp_path):
    rows = [{"text": f"t{n} " + "y" * (n * 37 % 5000), "n": n * 10 ** (n % 7)} for n in range(300)]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows, indent=1))
    records = list(read_jsonl(data).rows)
    assert [r.values for r in records] == rows and records[-1].location == "row 300"
    for broken, why in (
        ('[{"text": "a"} {"text": "b"}]', "expected ',' or ']' after element 1"),
        ('[{"text": "a"},', "never closed"),
        ('[{"text": "a"}] x', "text after the closing"),
    ):
        data.write_text(broken)
        with pytest.raises(DataError, match=why):
            read_items(DataConfig(path=str(data)))


def test_a_parquet_file_name_is_never_a_glob_so_no_other_file_is_read(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["mine"]}), folder / "*.parquet")
    pq.write_table(pa.table({"text": ["a dotfile nobody dropped"]}), folder / ".hidden.parquet")
    pq.write_table(pa.table({"text": ["a file still being written"]}), folder / "half.parquet")
    assert read_items(DataConfig(path=str(folder / "*.parquet"))).texts == ["mine"]


def test_a_file_that_is_not_a_data_file_is_not_quoted_in_the_error(tmp_path):
    secret = "root:$6$Kq3Vx9$Zm0nSecretHashValue:19000:0:99999:7:::"
    data = tmp_path / "shadow.csv"
    data.write_text(secret + "\ndaemon:*:19000:0:99999:7:::\n")
    with pytest.raises(DataError) as e:
        read_items(DataConfig(path=str(data)))
    assert "Kq3Vx9" not in str(e.value) and "99999" not in str(e.value)
    assert "does not look like a header of column names" in str(e.value)
    data.write_text("id,body\na,x\n")  # a real header is still listed, to help
    with pytest.raises(DataError, match=r"the file has \['id', 'body'\]"):
        read_items(DataConfig(path=str(data)))


def _counting_reader(monkeypatch, fmt: str) -> list[int]:
    """Count the records a format's reader gives, over all the times a file is opened."""
    from freeal_stream import sources

    seen = [0]
    real = sources.READERS[fmt]

    def reader(path):
        records = real(path)
        inner = records.rows

        def rows():
            for r in inner:
                seen[0] += 1
                yield r

        records.rows = rows()
        return records

    monkeypatch.setitem(sources.READERS, fmt, reader)
    return seen


def test_a_gold_column_is_checked_without_reading_a_headed_file_twice(tmp_path, monkeypatch):
    # the first pass (is any gold value a class?) stops at the first that is; only JSON is read to its end
    data = tmp_path / "d.csv"
    data.write_text("text,gold\n" + "".join(f"text {n},{'zz' if n < 3 else 'pos'}\n" for n in range(1000)))
    seen = _counting_reader(monkeypatch, "csv")
    batch = read_items(DataConfig(path=str(data), gold_column="gold"), class_names=["pos", "neg"])
    assert len(batch.ids) == 1000 and seen[0] == 1000 + 4
    with pytest.raises(DataError, match="none of the 3 values of column 'gold'"):  # still refused, whole
        data.write_text("text,gold\na,x\nb,y\nc,z\n")
        read_items(DataConfig(path=str(data), gold_column="gold"), class_names=["pos", "neg"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t {n}", "gold": "pos"}) + "\n" for n in range(10)))
    seen = _counting_reader(monkeypatch, "jsonl")
    assert len(read_items(DataConfig(path=str(jsonl), gold_column="gold"), class_names=["pos"]).ids) == 10
    assert seen[0] == 20
