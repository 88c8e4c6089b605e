"""Prompt sets (PartiPrompts, HPSv2 benchmark, Pick-a-Pic v2, plain text; the spec syntax) on fixtures in the
datasets' own formats, and the Pick-a-Pic v2 → scored-format converter on a tiny parquet with hand-computed scores."""
import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tgo_fast.data import load_scored_dataset
from tgo_fast.pipeline import image_win_fractions, load_prompt_set, load_prompts, pickapic_to_scored
from tgo_fast.pipeline.cli import pickapic_main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PARTI = FIXTURES / "PartiPrompts.tsv"
HPSV2 = FIXTURES / "hpsv2_benchmark"


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


# five images a..e in four comparisons; win fractions: a (1 + 0.5)/2, b (0 + 1)/2, c (0.5 + 0)/2, d 0/1, e 1/1
PAIRS = [("a", "b", 1.0, 0.0, "cap ab"), ("a", "c", 0.5, 0.5, "cap ab"), ("c", "b", 0.0, 1.0, "cap ab"),
         ("d", "e", 0.0, 1.0, "cap de")]
EXPECTED = {"a": (0.75, 2), "b": (0.5, 2), "c": (0.25, 2), "d": (0.0, 1), "e": (1.0, 1)}
JPEGS = {uid: jpeg((30 * i, 255 - 30 * i, 7)) for i, uid in enumerate("abcdefg")}


def write_pickapic(root: Path, split: str, pairs=PAIRS, files: int = 2) -> None:
    """``root/data/<split>-0000i-of-0000n.parquet`` in Pick-a-Pic v2's columns (a subset of them), as the hub lays it out."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for part in range(files):
        rows = pairs[part::files]
        table = pa.table({"caption": [r[4] for r in rows], "image_0_uid": [r[0] for r in rows],
                          "image_1_uid": [r[1] for r in rows], "label_0": [r[2] for r in rows],
                          "label_1": [r[3] for r in rows], "jpg_0": [JPEGS[r[0]] for r in rows],
                          "jpg_1": [JPEGS[r[1]] for r in rows], "model_0": ["sd"] * len(rows)})
        pq.write_table(table, root / "data" / f"{split}-{part:05d}-of-{files:05d}.parquet")


# ---------------------------------------------------------------------------------------------- prompt sets
def test_partiprompts_reads_prompt_and_category_columns_and_filters():
    prompts = load_prompt_set(f"parti:{PARTI}")
    assert prompts.name == "parti" and len(prompts.prompts) == 4
    assert prompts.prompts[1] == 'A sign that says "Hello World".'  # a TSV without quoting: quotes stay
    assert prompts.metadata[1] == {"category": "Illustrations", "challenge": "Writing & Symbols"}
    animals = load_prompt_set(f"parti:{PARTI}?category=Animals")
    assert (animals.name, animals.prompts) == ("parti-Animals", ["A giraffe wearing a scarf"])
    with pytest.raises(ValueError, match="no prompt of category 'Cars'.*Animals"):
        load_prompt_set(f"parti:{PARTI}?category=Cars")


def test_hpsv2_benchmark_keeps_the_style_of_every_prompt():
    whole = load_prompt_set(f"hpsv2:{HPSV2}")
    styles = [meta["style"] for meta in whole.metadata]
    assert styles == ["anime"] * 2 + ["concept-art"] * 2 + ["paintings"] + ["photo"] * 3  # the benchmark's order
    assert whole.prompts[4] == "An oil painting of a harbour at dawn."
    photo = load_prompt_set(f"hpsv2:{HPSV2}?style=photo", num_prompts=2)
    assert photo.name == "hpsv2-photo" and len(photo.prompts) == 2 and photo.metadata[0] == {"style": "photo"}
    one_file = load_prompt_set(f"hpsv2:{HPSV2 / 'anime.json'}")
    assert one_file.prompts == whole.prompts[:2] and one_file.metadata[1] == {"style": "anime"}
    with pytest.raises(ValueError, match="unknown HPSv2 style 'sketch'"):
        load_prompt_set(f"hpsv2:{HPSV2}?style=sketch")


def test_hpsv2_errors_name_the_file(tmp_path):
    (tmp_path / "anime.json").write_text('["a"]')
    with pytest.raises(ValueError, match="lacks.*concept-art.json"):
        load_prompt_set(f"hpsv2:{tmp_path}")
    (tmp_path / "photo.json").write_text('{"prompt": "a"}')
    with pytest.raises(ValueError, match="photo.json' holds a dict; expected a JSON list"):
        load_prompt_set(f"hpsv2:{tmp_path}?style=photo")


def test_pickapic_reads_the_caption_column_of_a_split(tmp_path):
    pairs = PAIRS + [("f", "g", 1.0, 0.0, "   ")]  # a blank caption carries nothing to generate from: dropped
    write_pickapic(tmp_path / "hub", "test_unique", pairs, files=1)
    write_pickapic(tmp_path / "hub", "train", PAIRS[:1], files=1)
    prompts = load_prompt_set(f"pickapic:{tmp_path / 'hub'}")
    assert prompts.name == "pickapic-test_unique" and prompts.prompts == [p[4] for p in PAIRS]
    assert load_prompts(f"pickapic:{tmp_path / 'hub'}?split=train") == ["cap ab"]
    single_file = next((tmp_path / "hub" / "data").glob("train-*.parquet"))
    assert load_prompts(f"pickapic:{single_file}") == ["cap ab"]
    # a save_to_disk DatasetDict, as datasets.load_dataset(...).save_to_disk writes it
    datasets.DatasetDict({"test_unique": datasets.Dataset.from_dict({"caption": ["x", "y"]})}).save_to_disk(tmp_path / "saved")
    assert load_prompts(f"pickapic:{tmp_path / 'saved'}") == ["x", "y"]
    with pytest.raises(ValueError, match=r"splits \['test_unique'\], not 'validation_unique'.*\?split=NAME"):
        load_prompts(f"pickapic:{tmp_path / 'saved'}?split=validation_unique")
    with pytest.raises(ValueError, match="holds no validation-\\*.parquet.*huggingface-cli download"):
        load_prompts(f"pickapic:{tmp_path / 'hub'}?split=validation")


def test_prompt_spec_syntax_and_errors(tmp_path):
    assert load_prompts(f"text:{FIXTURES / 'prompts.txt'}") == load_prompts(FIXTURES / "prompts.txt") == \
        ["a red circle", "a blue square"]
    assert load_prompt_set("builtin:heldout", 3).name == "builtin-heldout"
    with pytest.raises(ValueError, match="unknown kind 'parquet'"):
        load_prompts(f"parquet:{tmp_path}")
    with pytest.raises(ValueError, match=r"bad option 'colour=red'.*\?category=VALUE"):
        load_prompts(f"parti:{PARTI}?colour=red")
    with pytest.raises(ValueError, match="unknown format '.tsv'.*parti:FILE"):
        load_prompts(PARTI)  # a bare .tsv is not guessed: name the kind
    (tmp_path / "PartiPrompts.tsv").write_text("prompt\tcategory\nx\ty\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['Prompt', 'Category'\]"):
        load_prompts(f"parti:{tmp_path / 'PartiPrompts.tsv'}")
    with pytest.raises(ValueError, match="is not a file"):
        load_prompts(f"parti:{tmp_path / 'missing.tsv'}")


# ---------------------------------------------------------------------------------------------- pairs → scores
def test_image_win_fractions_by_hand():
    columns = list(zip(*PAIRS))[:4]
    assert image_win_fractions(*columns) == EXPECTED
    with pytest.raises(ValueError, match="pair 1: label 2.0 of image 'b' is not a number in \\[0, 1\\]"):
        image_win_fractions(["a", "a"], ["b", "b"], [1.0, 0.0], [0.0, 2.0])


def test_pickapic_to_scored_writes_each_image_once_with_its_win_fraction(tmp_path):
    write_pickapic(tmp_path / "hub", "train")
    rows = pickapic_to_scored(tmp_path / "hub", tmp_path / "out", batch_size=1)
    assert {row["id"]: (row["score"], row["comparisons"]) for row in rows} == EXPECTED
    assert [row["id"] for row in rows] == ["a", "b", "c", "d", "e"]  # first appearance: file 0 (a-b, c-b), file 1 (a-c, d-e)
    assert {row["id"]: row["prompt"] for row in rows} == {"a": "cap ab", "b": "cap ab", "c": "cap ab", "d": "cap de",
                                                          "e": "cap de"}
    for uid, data in list(JPEGS.items())[:5]:
        assert (tmp_path / "out" / "images" / f"{uid}.jpg").read_bytes() == data  # the stored bytes, not re-encoded
    assert len(list((tmp_path / "out" / "images").iterdir())) == 5
    dataset = load_scored_dataset(tmp_path / "out" / "scored.jsonl")  # the trainer's --data reads it
    assert dict(zip(dataset["id"], dataset["score"])) == {uid: score for uid, (score, _) in EXPECTED.items()}


def test_pickapic_to_scored_errors_name_file_and_row(tmp_path, capsys):
    write_pickapic(tmp_path / "bad", "train", PAIRS[:2] + [("f", "g", 1.5, 0.0, "c")], files=1)
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet' row 2: label 1.5 of image 'f'"):
        pickapic_to_scored(tmp_path / "bad", tmp_path / "out")
    pq.write_table(pa.table({"caption": ["c"], "image_0_uid": ["a"]}), tmp_path / "thin.parquet")
    with pytest.raises(ValueError, match=r"thin.parquet' lacks the Pick-a-Pic v2 column\(s\) \['image_1_uid'"):
        pickapic_to_scored(tmp_path / "thin.parquet", tmp_path / "out")
    write_pickapic(tmp_path / "hub", "train")
    pickapic_main(["--source", str(tmp_path / "hub"), "--out", str(tmp_path / "cli")])
    assert "5 images scored" in capsys.readouterr().out
    assert json.loads((tmp_path / "cli" / "scored.jsonl").read_text().splitlines()[0])["score"] == 0.75
