"""The stage timing record: parts that ran beside another stage are shown but not added up."""

from ringflow.tasks.timings import StageTimings


def test_concurrent_parts_are_shown_but_not_in_the_totals():
    t = StageTimings()
    t.add("train", "training epochs (rank 0)", 4.0, "work")
    t.add("train", "rank start-up + shutdown (horovodrun)", 3.0)
    t.add("baseline", "tune, fit and score", 5.0, "work", concurrent=True)
    t.add("train", "MLflow: lineage (manifest, config, data)", 2.0, concurrent=True)
    t.add("evaluate", "waiting for the baseline (beside the training)", 0.5, "work")

    assert t.total() == 7.5 and t.total("work") == 4.5
    rows = t.rows()
    assert [r[0] for r in rows] == ["train", "train", "train", "baseline", "evaluate"]  # stage order
    assert ("baseline", "tune, fit and score", "work, beside", 5.0) in rows
    md = t.markdown()
    assert "| baseline | tune, fit and score | work, beside | 5.00 |" in md and "**7.50**" in md
    assert "beside" in t.text_lines()[-1] and "7.50s" in t.text_lines()[-1]


def test_a_record_without_concurrent_parts_reads_as_before():
    t = StageTimings()
    t.add("shard", "sharding", 2.0, "work")
    t.add("prefect", "summary artifact", 1.0)
    assert t.total() == 3.0
    assert "beside" not in t.markdown() and "beside" not in t.text_lines()[-1]
    # a record saved before the field existed still loads
    assert (
        StageTimings.model_validate({"parts": [{"stage": "s", "part": "p", "kind": "work", "seconds": 1}]}).total() == 1
    )
